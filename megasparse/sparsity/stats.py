"""Sparsity statistics accumulated from the forward pass (no extra GEMMs, no per-step sync).

Each MLP already returns per-neuron fire counts (tokens with g_j > 0) for its local shard. We
sum them on the device over a log interval; only `reduce_and_reset`, called at log intervals,
synchronises and communicates. Under tensor parallelism a rank holds H/tp neurons of the same
tokens, so nnz/token sums over TP ranks; over DP ranks both counts and tokens sum.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class SparsityStats:
    def __init__(self, n_layers: int, hidden_local: int, hidden_global: int, device: torch.device):
        self.n_layers, self.hidden_global = n_layers, hidden_global
        self.fire = torch.zeros(n_layers, hidden_local, dtype=torch.int64, device=device)
        self.l1 = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self.tokens = 0
        self.batches = 0
        self.has_counts = False

    def update(self, fire_counts: list, l1_per_layer: torch.Tensor, tokens: int) -> None:
        if all(c is not None for c in fire_counts) and fire_counts:
            self.fire += torch.stack(fire_counts).to(self.fire.dtype)
            self.has_counts = True
        self.l1 += l1_per_layer.detach().to(self.l1.dtype)
        self.tokens += tokens
        self.batches += 1

    def reduce_and_reset(self, dp_group=None, tp_group=None) -> dict:
        """Per-layer nnz/token, nnz fraction of H, dead fraction over the interval, and L1."""
        tokens = torch.tensor([float(self.tokens), float(self.batches)], device=self.fire.device)
        fire, l1 = self.fire.clone(), self.l1.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(fire, group=dp_group)
            dist.all_reduce(tokens, group=dp_group)
            dist.all_reduce(l1, group=dp_group)
            # l1 per layer is a per-shard sum over neurons: add the TP shards.
            if tp_group is not None and dist.get_world_size(tp_group) > 1:
                dist.all_reduce(l1, group=tp_group)
        n_tok, n_batches = tokens.tolist()
        dp_batches = max(n_batches, 1.0)
        dead_local = (fire == 0).sum(1).double()
        nnz_local = fire.sum(1).double()
        if tp_group is not None and dist.is_initialized() and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(dead_local, group=tp_group)
            dist.all_reduce(nnz_local, group=tp_group)
        out = {"l1_layer": (l1 / dp_batches).tolist()}
        if self.has_counts and n_tok > 0:
            nnz = (nnz_local / n_tok).tolist()
            out.update({
                "nnz_per_token_layer": nnz,
                "nnz_fraction_layer": [v / self.hidden_global for v in nnz],
                "dead_fraction_layer": (dead_local / self.hidden_global).tolist(),
                "nnz_per_token": sum(nnz) / len(nnz),
                "dead_fraction": float((dead_local / self.hidden_global).mean()),
            })
        self.fire.zero_()
        self.l1.zero_()
        self.tokens = self.batches = 0
        self.has_counts = False
        return out
