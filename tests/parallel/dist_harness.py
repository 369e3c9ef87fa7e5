"""Run a function on N gloo processes (CPU) and surface any worker's exception in the test.

Workers are forked (torch.multiprocessing.start_processes, "fork"): they inherit the already
imported torch and megasparse, which saves seconds of imports per process on a small CPU box.
The parent never runs collectives or multi-threaded kernels before forking (OMP_NUM_THREADS=1). Each worker joins a file-store rendezvous, builds the TP x DP groups
for `tp`, runs ``fn(rank, world, *args)``, and tears down.
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, tp: int, store_path: str, fn, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        from megasparse.parallel.state import destroy_model_parallel, initialize_model_parallel

        initialize_model_parallel(tp)
        fn(rank, world, *args)
        destroy_model_parallel()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, *args, tp: int | None = None) -> None:
    """fn(rank, world, *args) on `world` processes, TP degree `tp` (default: all ranks TP)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(_worker, args=(world, tp or world, store, fn, args), nprocs=world, join=True,
                           start_method="fork")
