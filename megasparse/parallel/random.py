"""RNG tracking for tensor-parallel regions (Megatron's get_cuda_rng_tracker, for CUDA or CPU).

Randomness outside a TP region (e.g. dropout on the replicated residual stream) must be the same
on every TP rank, or the replicas diverge; randomness inside a region (dropout on a rank's own
heads or neurons) must differ across TP ranks, or the shards drop correlated units. The default
generator serves the first case. The tracker holds named extra generator states, and
``with get_rng_tracker().fork():`` runs a block on the TP-region state, then restores the
default state, so the default stream is unaffected by how much randomness the region used.

The model has no dropout today, but the tracker is seeded per TP rank at startup and its states
belong in checkpoints (`get_states` / `set_states`) so that a resumed run draws the same numbers.
"""
from __future__ import annotations

import contextlib

import torch

TP_REGION_RNG = "tensor-parallel-rng"
_TP_SEED_OFFSET = 2718  # Megatron's offset, so the region seed never equals the default seed


def _device_rng(use_cuda: bool):
    """(get_state, set_state, seed) of the one generator the model's random ops use: the current
    CUDA device's when CUDA is available (the trainer has set the device by then), else the CPU's."""
    if use_cuda:
        return torch.cuda.get_rng_state, torch.cuda.set_rng_state, torch.cuda.manual_seed
    # default_generator only: torch.manual_seed would also reseed every CUDA device.
    return torch.get_rng_state, torch.set_rng_state, torch.default_generator.manual_seed


class RNGStatesTracker:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.seeds: set[int] = set()
        # Fixed once, so that states taken from one generator are never set into another.
        self.use_cuda = torch.cuda.is_available()

    def add(self, name: str, seed: int) -> None:
        """Create a named state from `seed` without disturbing the current default state."""
        if seed in self.seeds:
            raise ValueError(f"RNG seed {seed} is already tracked; every tracked state needs its own seed")
        if name in self.states:
            raise ValueError(f"RNG state '{name}' is already tracked")
        get_state, set_state, manual_seed = _device_rng(self.use_cuda)
        saved = get_state()
        manual_seed(seed)
        self.states[name] = get_state()
        set_state(saved)
        self.seeds.add(seed)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of the tracked states, for a checkpoint's client_state."""
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TP_REGION_RNG):
        """Run the block on the named state; advance it; restore the default state after."""
        if name not in self.states:
            raise KeyError(f"RNG state '{name}' is not tracked; call model_parallel_seed() at startup")
        get_state, set_state, _ = _device_rng(self.use_cuda)
        saved = get_state()
        set_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = get_state()
            set_state(saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int, tp_rank: int) -> None:
    """Seed the TP-region stream differently on every TP rank (and identically across DP ranks
    that hold the same shard, so DP replicas stay in lockstep)."""
    _TRACKER.reset()
    _TRACKER.add(TP_REGION_RNG, seed + _TP_SEED_OFFSET + tp_rank)
