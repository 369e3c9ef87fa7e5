"""Process-group setup for every way a run can start: plain `python`/`megasparse train` (one
process, no launcher), `deepspeed --num_gpus N`, and torchrun.

Both launchers export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; a bare process gets
single-process defaults here, so no launcher is ever required.
"""
from __future__ import annotations

import os
import socket
import sys
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from megasparse.errors import ConfigError
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def quiet_known_warnings() -> None:
    # torch 2.13 deprecates the collective names DeepSpeed uses; the GPU machine's torch 2.11 has
    # no replacement, so the old names stay and the warning is noise (DESIGN.md).
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*")
    warnings.filterwarnings("ignore", message=".*_all_gather_base.*")
    warnings.filterwarnings("ignore", message=".*_reduce_scatter_base.*")


def init_distributed(device_request: str = "auto", backend: str = "auto") -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_request, local_rank)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    quiet_known_warnings()
    if device.type == "cpu":
        # A CPU run must not compile DeepSpeed's shared-memory op (25 s) or oversubscribe cores.
        os.environ.setdefault("OMP_NUM_THREADS", "1" if world > 1 else str(os.cpu_count() or 1))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        # The L1 term drives activations towards zero; denormal floats then make CPU math ~10x
        # slower (measured: demo tokens/s fell from 850 to 290 as sparsity set in).
        torch.set_flush_denormal(True)
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (so the module exists before we patch it)

    if device.type == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   verbose=False, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def shutdown_distributed() -> None:
    """End of a run on every rank: wait for the others, then tear the process group down. A rank
    that simply exited while a peer was still busy (rank 0 writing a file, say) sometimes aborted
    at interpreter exit with "terminate called without an active exception" (gloo's threads
    destroyed still running), which failed CI runs."""
    from megasparse.parallel.state import destroy_model_parallel

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    destroy_model_parallel()
