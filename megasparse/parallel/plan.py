"""TensorParallelPlan: the model's seam (model/transformer.py's ParallelPlan) filled with
column/row/vocab-parallel layers, the TP mappings and the vocab-parallel cross-entropy.

What each TP rank holds and where it communicates (forward / backward):
- embedding: vocab rows [r V/t, (r+1) V/t); all-reduce of the embeddings / none.
- attention: n_heads/t query heads and their kv heads; Q/K/V column-parallel behind one
  copy-to-region (none / all-reduce of dx), output row-parallel (all-reduce / none).
- sparse MLP: H/t neurons; copy-to-region on x, all-reduce of y after down (as attention).
- L1 term: a per-shard partial sum, summed over TP in the forward (one [n_layers] all-reduce per
  micro-batch) so that loss = CE + lambda * aux is the same number at any TP degree.
- LM head (tied or not): vocab-sharded logits; the cross-entropy reduces [N]-sized statistics.
"""
from __future__ import annotations

import torch
from torch import nn

from megasparse.model.transformer import ParallelPlan
from megasparse.parallel.cross_entropy import vocab_parallel_cross_entropy
from megasparse.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megasparse.parallel.mappings import (broadcast_, copy_to_region, gather_from_region,
                                          reduce_from_region)
from megasparse.parallel.sharding import shard_range, tag_shard
from megasparse.parallel.state import ParallelState


class TensorParallelPlan(ParallelPlan):
    def __init__(self, state: ParallelState, replica_groups: dict | None = None, init_seed: int | None = None):
        """`replica_groups` maps a replica count k to this rank's group of k consecutive TP ranks
        that hold the same kv heads (only when tp > n_kv_heads; see build_parallel)."""
        super().__init__(init_seed)
        self.state = state
        self.tp_size, self.tp_rank, self.group = state.tp_size, state.tp_rank, state.tp_group
        self.replica_groups = replica_groups or {}

    # ------------------------------------------------------------------ layers
    def linear(self, in_features: int, out_features: int, kind: str, input_in_region: bool = False,
               replicas: int = 1) -> nn.Module:
        if kind == "column":
            group = None
            if replicas > 1:
                if replicas not in self.replica_groups:
                    raise ValueError(f"no replica group for {replicas} replicas; build_parallel creates "
                                     f"them from model.n_kv_heads")
                group = self.replica_groups[replicas]
            return ColumnParallelLinear(in_features, out_features, state=self.state,
                                        input_in_region=input_in_region, replicas=replicas, replica_group=group)
        if kind == "row":
            return RowParallelLinear(in_features, out_features, state=self.state)
        raise ValueError(f"linear kind {kind!r} is not 'column' or 'row'")

    def embedding(self, vocab: int, dim: int) -> nn.Module:
        return VocabParallelEmbedding(vocab, dim, state=self.state)

    def lm_head(self, dim: int, vocab: int) -> nn.Module:
        # The model uses only its weight (through lm_logits, which does the input copy).
        return ColumnParallelLinear(dim, vocab, state=self.state)

    # ------------------------------------------------------------------ regions
    def enter_region(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_region(x, self.group)

    def leave_region(self, y: torch.Tensor) -> torch.Tensor:
        return reduce_from_region(y, self.group)

    def mlp_regions(self):
        return self.enter_region, self.leave_region

    def shard_sparse_mlp(self, mlp: nn.Module) -> None:
        """gate/up are column shards (partition_dim 0) and down a row shard (partition_dim 1) of
        the full [H, D] / [D, H] weights; this rank owns neurons [r H/t, (r+1) H/t)."""
        hidden_local = mlp.gate_weight.shape[0]
        hidden = hidden_local * self.tp_size
        start, _ = shard_range(hidden, self.tp_rank, self.tp_size)
        tag_shard(mlp.gate_weight, 0, start, hidden, self.tp_rank)
        tag_shard(mlp.up_weight, 0, start, hidden, self.tp_rank)
        tag_shard(mlp.down_weight, 1, start, hidden, self.tp_rank)

    def sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        return reduce_from_region(t, self.group)

    # ------------------------------------------------------------------ output
    def lm_logits(self, hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        return copy_to_region(hidden, self.group) @ head_weight.t()

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        vocab_start = self.tp_rank * logits.shape[-1]
        return vocab_parallel_cross_entropy(logits, labels, vocab_start, self.group)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_from_region(logits, self.group)

    # ------------------------------------------------------------------ init
    def initialization_seed(self) -> int:
        if self.init_seed is not None:
            return int(self.init_seed)
        # Drawn from the global generator like the default plan, then agreed on by the TP group
        # so that the shards are cut from one full tensor even if the ranks' generators differ.
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        return int(broadcast_(seed, 0, self.group).item())
