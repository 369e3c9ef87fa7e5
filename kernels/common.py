"""Pieces every Triton kernel module here shares: interpreter detection and the grouped
(L2-friendly) order in which GEMM-shaped grids visit their tiles."""
from __future__ import annotations

import triton
import triton.language as tl

from .interpreter import interpreting

__all__ = ["interpreting", "grouped_tile_ids"]   # interpreting re-exported: the kernel modules import it here


@triton.jit
def grouped_tile_ids(M, n_tiles_n, BM: tl.constexpr, GROUP_M: tl.constexpr, pid=None):
    """(row tile, column tile) of program `pid`: GROUP_M row tiles sweep the column tiles
    together, so the tiles they share stay in L2."""
    if pid is None:
        pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    per_group = GROUP_M * n_tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n
