"""How a parameter is sharded over the TP group, recorded on the parameter itself.

Three attributes follow the Megatron/DeepSpeed convention and are what DeepSpeed reads:
- ``tensor_model_parallel``: DeepSpeed's grad norm (``deepspeed.runtime.utils.
  is_model_parallel_parameter``, used by ZeRO-1/2 ``get_grad_norm_direct`` and by
  ``clip_grad_norm_``) counts a parameter on every TP rank when this is true, and only on TP
  rank 0 otherwise. Replicated parameters (norm gains) must therefore stay untagged, and a shard
  that several TP ranks hold identically (GQA kv heads when tp > n_kv_heads) is tagged on the
  first of its holders only, so that every element is counted exactly once.
- ``partition_dim``: the dimension that is split (0 for column-parallel weights and the
  vocabulary, 1 for row-parallel weights).
- ``partition_stride``: always 1 here (no interleaved shards).

``tp_shard`` (a :class:`ShardInfo`) adds where this rank's slice sits in the full tensor; the
TP-invariant initialisation and the exporter use it to cut from / paste into the full tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardInfo:
    dim: int            # the split dimension (== partition_dim)
    start: int          # offset of this rank's slice along dim in the full tensor
    full_size: int      # size of dim in the full (unsharded) tensor
    replicas: int = 1   # how many TP ranks hold this same slice (kv heads when tp > n_kv_heads)

    def full_shape(self, local_shape: torch.Size) -> tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] = self.full_size
        return tuple(shape)


def shard_range(full_size: int, tp_rank: int, tp_size: int, replicas: int = 1) -> tuple[int, int]:
    """(start, length) of a TP rank's contiguous slice; `replicas` consecutive ranks share one."""
    distinct = tp_size // replicas
    if tp_size % replicas or full_size % distinct:
        raise ValueError(f"cannot split size {full_size} over tp={tp_size} with {replicas} replicas per slice")
    length = full_size // distinct
    return (tp_rank // replicas) * length, length


def tag_shard(param: torch.nn.Parameter, dim: int, start: int, full_size: int, tp_rank: int,
              replicas: int = 1) -> torch.nn.Parameter:
    param.tensor_model_parallel = tp_rank % replicas == 0  # count each distinct slice once
    param.partition_dim = dim
    param.partition_stride = 1
    param.tp_shard = ShardInfo(dim=dim, start=start, full_size=full_size, replicas=replicas)
    return param


def shard_of(param: torch.Tensor) -> ShardInfo | None:
    return getattr(param, "tp_shard", None)
