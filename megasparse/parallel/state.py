"""Process groups for tensor parallelism (TP) x data parallelism (DP).

TP ranks are consecutive (ranks 0..tp-1 form the first TP group), as in Megatron, so a TP group
stays inside one node when tp <= GPUs per node. DP groups take one rank from each TP group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megasparse.errors import ConfigError


@dataclass
class ParallelState:
    tp_size: int
    dp_size: int
    tp_rank: int
    dp_rank: int
    tp_group: object
    dp_group: object


_STATE: ParallelState | None = None


def initialize_model_parallel(tp_size: int) -> ParallelState:
    """Create the TP and DP groups. Every rank must call this with the same tp_size."""
    global _STATE
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp_size:
        raise ConfigError(f"world size {world} is not divisible by parallel.tp={tp_size}; launch a multiple of "
                          f"{tp_size} processes (e.g. launch/train.sh --num_gpus {tp_size} ...) or lower parallel.tp")
    dp_size = world // tp_size
    tp_group = dp_group = None
    # new_group is collective: every rank creates every group, and keeps its own.
    for start in range(0, world, tp_size):
        ranks = list(range(start, start + tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            tp_group = group
    for offset in range(tp_size):
        ranks = list(range(offset, world, tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    _STATE = ParallelState(tp_size=tp_size, dp_size=dp_size, tp_rank=rank % tp_size,
                           dp_rank=rank // tp_size, tp_group=tp_group, dp_group=dp_group)
    return _STATE


def get_parallel_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("initialize_model_parallel() has not been called")
    return _STATE


def destroy_model_parallel() -> None:
    global _STATE
    _STATE = None
