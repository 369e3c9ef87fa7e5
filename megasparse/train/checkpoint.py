"""Checkpoints through DeepSpeed's `save_checkpoint`, made atomic.

DeepSpeed writes a tag folder per save. We tell it not to touch `latest` and, only after every
rank has finished writing (a barrier) and the files are fsynced, rank 0 points `latest` at the
new tag with an atomic rename. A crash mid-save therefore leaves `latest` on the previous,
complete checkpoint.
"""
from __future__ import annotations

import os

import torch.distributed as dist

LATEST = "latest"


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_latest(ckpt_dir: str, tag: str) -> None:
    tmp = os.path.join(ckpt_dir, f".{LATEST}.tmp")
    with open(tmp, "w") as fh:
        fh.write(tag)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, LATEST))


def read_latest(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return fh.read().strip() or None


def save_checkpoint(engine, ckpt_dir: str, step: int, client_state: dict, rank: int) -> str:
    """Save on every rank (ZeRO shards are per rank); return the tag."""
    tag = tag_for_step(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        _fsync_tree(os.path.join(ckpt_dir, tag))
        write_latest(ckpt_dir, tag)
    if dist.is_initialized():
        dist.barrier()
    return tag
