"""Column-parallel and row-parallel linear layers and the vocab-parallel embedding (bias-free,
as the model is). Weights use nn.Linear / nn.Embedding layouts and are tagged with how they
are sharded (megasparse/parallel/sharding.py). All communication goes through mappings.py.

Shapes, for a TP group of size t and rank r:
- ColumnParallelLinear(in, out): weight [out/t, in]; y_r = x W_r^T is this rank's slice of the
  output features. With `replicas` = k > 1, k consecutive ranks hold the same slice of out/(t/k)
  features (GQA kv heads when t > n_kv_heads); their weight gradients are summed over those k
  ranks so the copies stay identical.
- RowParallelLinear(in, out): weight [out, in/t]; the input is this rank's slice of the input
  features and the partial products are all-reduced.
- VocabParallelEmbedding(V, D): weight [V/t, D], rows [r V/t, (r+1) V/t); ids outside the
  range look up zeros and the all-reduce assembles each embedding from its owner.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megasparse.parallel.mappings import (copy_to_region, gather_from_region, reduce_from_region,
                                          scatter_to_region)
from megasparse.parallel.sharding import shard_range, tag_shard
from megasparse.parallel.state import ParallelState, get_parallel_state


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, state: ParallelState | None = None,
                 input_in_region: bool = False, gather_output: bool = False, replicas: int = 1,
                 replica_group=None):
        super().__init__()
        state = state or get_parallel_state()
        self.group = state.tp_group
        self.in_features, self.out_features = in_features, out_features
        self.input_in_region, self.gather_output = input_in_region, gather_output
        if gather_output and replicas > 1:
            raise ValueError("gather_output is not defined for replicated column shards")
        start, local = shard_range(out_features, state.tp_rank, state.tp_size, replicas)
        self.replica_group = replica_group if replicas > 1 else None
        self.weight = nn.Parameter(torch.empty(local, in_features))
        tag_shard(self.weight, 0, start, out_features, state.tp_rank, replicas)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_in_region:
            x = copy_to_region(x, self.group)
        weight = self.weight
        if self.replica_group is not None:
            # Identity forward; the backward sums the weight gradient over the ranks holding
            # this same slice, each of which saw only its own query heads' share of it.
            weight = copy_to_region(weight, self.replica_group)
        y = F.linear(x, weight)
        return gather_from_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (local {self.weight.shape[0]})"


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, state: ParallelState | None = None,
                 input_is_parallel: bool = True):
        super().__init__()
        state = state or get_parallel_state()
        self.group = state.tp_group
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        start, local = shard_range(in_features, state.tp_rank, state.tp_size)
        self.weight = nn.Parameter(torch.empty(out_features, local))
        tag_shard(self.weight, 1, start, in_features, state.tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.group)
        return reduce_from_region(F.linear(x, self.weight), self.group)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}"


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, *, state: ParallelState | None = None):
        super().__init__()
        state = state or get_parallel_state()
        self.group = state.tp_group
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start, local = shard_range(num_embeddings, state.tp_rank, state.tp_size)
        self.vocab_end = self.vocab_start + local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))
        tag_shard(self.weight, 0, self.vocab_start, num_embeddings, state.tp_rank)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim} (rows {self.vocab_start}..{self.vocab_end - 1})"
