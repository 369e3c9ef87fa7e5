"""Sparsity statistics accumulated from the forward pass (no extra GEMMs, no per-step sync).

Each MLP already returns per-neuron fire counts (tokens with g_j > 0) for its local shard. We
sum them on the device over a log interval; only `reduce_and_reset`, called at log intervals,
synchronises and communicates. Under tensor parallelism a rank holds H/tp neurons of the same
tokens, so nnz/token sums over TP ranks; over DP ranks both counts and tokens sum.

Beyond the interval, a *window* of at least ``window_tokens`` tokens (whole log intervals, kept
as DP-reduced per-interval counts) gives per-neuron firing counts and the dead fraction: a
neuron is dead when it did not fire once in the window. The window is what dead-neuron
re-initialisation and the firing-rate dump read. ``window_tokens=0`` means one log interval.

The per-token maximum of nnz needs per-token counts from the MLP (``token_nnz``, [M] per layer;
see docs/sparsity.md). It is an exact running max on the device. Under TP a token's count is a
sum over shards, so each micro-batch's [L, M] counts are summed over the TP group first: one
small all-reduce (L*M int32, ~0.8 MB at 24 layers x 8k tokens, against the MB-sized activation
all-reduces TP already does per layer), stream-ordered on NCCL, so still no host sync.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist


def _world(group, none_is_world: bool = True) -> int:
    """Size of a group. For DP, None is the default (world) group, as in torch.distributed; for
    TP, None means no tensor parallelism (``none_is_world=False``)."""
    if not (dist.is_available() and dist.is_initialized()) or (group is None and not none_is_world):
        return 1
    return dist.get_world_size(group)


class SparsityStats:
    def __init__(self, n_layers: int, hidden_local: int, hidden_global: int, device: torch.device,
                 window_tokens: int = 0, tp_group=None):
        self.n_layers, self.hidden_local, self.hidden_global = n_layers, hidden_local, hidden_global
        self.tp = hidden_global // hidden_local
        if self.tp > 1 and _world(tp_group, False) != self.tp:
            raise ValueError(f"hidden {hidden_global} over a local {hidden_local} means tp={self.tp}, but the "
                             f"tp_group has {_world(tp_group, False)} ranks; pass the tensor-parallel group")
        self.tp_group = tp_group
        self.window_tokens = window_tokens
        self.device = device
        self.fire = torch.zeros(n_layers, hidden_local, dtype=torch.int64, device=device)
        self.l1 = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self.nnz_max = torch.zeros(n_layers, dtype=torch.int64, device=device)
        self.tokens = 0
        self.batches = 0
        self.has_counts = False
        self.has_max = False
        # The window: (global tokens, DP-reduced local counts) per log interval, and their sum.
        self._intervals: deque = deque()
        self.window_fire = torch.zeros_like(self.fire)
        self.window_token_count = 0

    # ------------------------------------------------------------------ every micro-batch
    def update(self, fire_counts: list, l1_per_layer: torch.Tensor, tokens: int,
               token_nnz: list | None = None) -> None:
        """Device-side accumulation only; never syncs with the host."""
        if fire_counts and all(c is not None for c in fire_counts):
            self.fire += torch.stack(fire_counts).to(self.fire.dtype)
            self.has_counts = True
        if token_nnz and all(t is not None for t in token_nnz):
            per_token = torch.stack(token_nnz).to(torch.int32)  # [L, M]
            if self.tp > 1:
                dist.all_reduce(per_token, group=self.tp_group)  # a token's nnz sums over shards
            self.nnz_max = torch.maximum(self.nnz_max, per_token.amax(1).to(self.nnz_max.dtype))
            self.has_max = True
        self.l1 += l1_per_layer.detach().to(self.l1.dtype)
        self.tokens += tokens
        self.batches += 1

    # ------------------------------------------------------------------ log intervals
    def reduce_and_reset(self, dp_group=None, tp_group=None) -> dict:
        """Per-layer nnz/token (mean, max), nnz fraction of H, the L1 term, and the window's
        dead fraction; the DP-reduced counts also enter the window."""
        tokens = torch.tensor([float(self.tokens), float(self.batches)], dtype=torch.float64, device=self.device)
        fire, l1 = self.fire.clone(), self.l1.clone()
        if _world(dp_group) > 1:
            dist.all_reduce(fire, group=dp_group)
            dist.all_reduce(tokens, group=dp_group)
            dist.all_reduce(l1, group=dp_group)
        if _world(tp_group, False) > 1:
            dist.all_reduce(l1, group=tp_group)  # l1 per layer is a per-shard sum over neurons
        n_tok, n_batches = tokens.tolist()
        out = {"l1_layer": (l1 / max(n_batches, 1.0)).tolist()}
        if self.has_counts and n_tok > 0:
            self._push_interval(fire, int(n_tok))
            nnz_local = fire.sum(1).double()
            dead_local = (self.window_fire == 0).sum(1).double()
            if _world(tp_group, False) > 1:
                both = torch.stack([nnz_local, dead_local])
                dist.all_reduce(both, group=tp_group)
                nnz_local, dead_local = both[0], both[1]
            nnz = (nnz_local / n_tok).tolist()
            dead = (dead_local / self.hidden_global).tolist()
            out.update({
                "nnz_per_token_layer": nnz,
                "nnz_fraction_layer": [v / self.hidden_global for v in nnz],
                "dead_fraction_layer": dead,
                "nnz_per_token": sum(nnz) / len(nnz),
                "dead_fraction": sum(dead) / len(dead),
                "dead_window_tokens": self.window_token_count,
            })
        if self.has_max:
            out["nnz_max_layer"] = self._reduce_max(dp_group)
            out["nnz_max"] = max(out["nnz_max_layer"])
        self._reset_interval()
        return out

    def _reduce_max(self, dp_group) -> list:
        mx = self.nnz_max.clone()   # already summed over TP shards per token (update)
        if _world(dp_group) > 1:
            dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=dp_group)
        return [float(v) for v in mx.tolist()]

    def _reset_interval(self) -> None:
        self.fire.zero_()
        self.l1.zero_()
        self.nnz_max.zero_()
        self.tokens = self.batches = 0
        self.has_counts = self.has_max = False

    # ------------------------------------------------------------------ the window
    def _push_interval(self, fire: torch.Tensor, n_tok: int) -> None:
        self._intervals.append((n_tok, fire))
        self.window_fire += fire
        self.window_token_count += n_tok
        # Drop the oldest intervals while the rest still cover the window.
        while len(self._intervals) > 1 and self.window_token_count - self._intervals[0][0] >= self.window_tokens:
            old_tok, old_fire = self._intervals.popleft()
            self.window_fire -= old_fire
            self.window_token_count -= old_tok

    def window_full(self) -> bool:
        return self.window_token_count > 0 and self.window_token_count >= self.window_tokens

    def dead_masks(self) -> list:
        """Per layer, a bool [H_local] of neurons that never fired in the window (identical on
        every DP rank, because the counts are DP-reduced)."""
        return list(self.window_fire == 0)

    def reset_window(self) -> None:
        """Forget the window, e.g. after re-initialising neurons: deadness needs new evidence."""
        self._intervals.clear()
        self.window_fire.zero_()
        self.window_token_count = 0

    def firing_rates(self, tp_group=None) -> torch.Tensor:
        """[L, H_global] float64 fraction of the window's tokens on which each neuron fired.
        A collective over the TP group (every TP rank must call it)."""
        local = self.window_fire.double() / max(self.window_token_count, 1)
        if _world(tp_group, False) > 1:
            parts = [torch.empty_like(local) for _ in range(_world(tp_group, False))]
            dist.all_gather(parts, local, group=tp_group)
            local = torch.cat(parts, dim=1)  # column-parallel: TP rank r owns neurons [r*H/tp, (r+1)*H/tp)
        return local.cpu()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, dp_group=None) -> dict:
        """Everything exact resume needs: the open interval's sums and the window (on CPU).

        A collective over the DP group (every rank calls it while saving): the open interval is
        per DP rank, but DeepSpeed writes the client state from DP rank 0 only, so its sums are
        DP-reduced here (nnz_max by max). The window already is DP-reduced. The state therefore
        does not depend on the DP degree, and load_state_dict gives the sums to one DP rank."""
        return {**self.interval_state(dp_group, reduced=True), "dp_reduced": True,
                "has_counts": self.has_counts, "has_max": self.has_max,
                "intervals": [(n, _cpu(f)) for n, f in self._intervals],
                "window_fire": _cpu(self.window_fire), "window_token_count": self.window_token_count}

    def interval_state(self, dp_group=None, reduced: bool = False) -> dict:
        """The open interval's sums (on CPU): this rank's own, for an exact resume at the same
        layout, or with `reduced` their DP sums (a collective over dp_group)."""
        fire, l1, nnz_max = self.fire.clone(), self.l1.clone(), self.nnz_max.clone()
        counts = torch.tensor([self.tokens, self.batches], dtype=torch.int64, device=self.device)
        if reduced and _world(dp_group) > 1:
            for t in (fire, l1, counts):
                dist.all_reduce(t, group=dp_group)
            dist.all_reduce(nnz_max, op=dist.ReduceOp.MAX, group=dp_group)
        tokens, batches = counts.tolist()
        return {"fire": _cpu(fire), "l1": _cpu(l1), "nnz_max": _cpu(nnz_max), "tokens": tokens, "batches": batches}

    def load_interval(self, state: dict) -> None:
        """Put back interval_state()'s sums (after load_state_dict, which restores the flags)."""
        if tuple(state["fire"].shape) == tuple(self.fire.shape):
            to = lambda t: t.to(self.device, copy=True)  # noqa: E731
            self.fire, self.l1, self.nnz_max = to(state["fire"]), to(state["l1"]), to(state["nnz_max"])
            self.tokens, self.batches = state["tokens"], state["batches"]

    def load_state_dict(self, state: dict, holds_interval: bool = True) -> bool:
        """Restore a state_dict. The open interval's DP-reduced sums go to the rank with
        holds_interval (DP rank 0); the others restart it from zero, so the next log interval
        sums them once. Returns False, restoring nothing, for another local layout (TP changed):
        the statistics then restart, and nothing else depends on them."""
        if tuple(state["fire"].shape) != tuple(self.fire.shape):
            return False
        self._reset_interval()
        if holds_interval:
            self.load_interval(state)
        # the same flags on every rank: reduce_and_reset's collectives depend on them
        self.has_counts, self.has_max = state["has_counts"], state["has_max"]
        to = lambda t: t.to(self.device, copy=True)  # noqa: E731
        self._intervals = deque((n, to(f)) for n, f in state["intervals"])
        self.window_fire, self.window_token_count = to(state["window_fire"]), state["window_token_count"]
        return True


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy for a checkpoint, never an alias of the live sums (t.cpu() is one on CPU)."""
    return t.to("cpu", copy=True)
