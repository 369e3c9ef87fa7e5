"""Checkpoints through DeepSpeed's `save_checkpoint`, made atomic, plus what exact resume needs.

A save writes, into the tag folder `checkpoints/step00000100/`:
- DeepSpeed's files (model states per TP rank, ZeRO optimizer shards per rank, LR scheduler,
  and our client_state: step, consumed samples, L1 schedule/controller, statistics windows,
  config, tokenizer and data hashes, version);
- `rng_rank<r>.pt` per rank: python, numpy, torch CPU/CUDA and TP-tracker RNG states;
- `interval_rank<r>.pt` per rank: that rank's sums of the open log interval (loss terms and
  sparsity statistics), which a resume at the same layout restores exactly;
- `megasparse.json` (rank 0): the facts a resume checks before loading anything heavy.

Only after every rank has finished (a barrier) and the files are fsynced does rank 0 point
`latest` at the new tag, with an atomic rename. A crash mid-save therefore leaves `latest` on
the previous, complete checkpoint; the half-written folder is ignored and later pruned.

A tag can already exist: a run resumed from an earlier step of the same run folder saves over
the later steps of the branch it left. DeepSpeed would overwrite such a folder in place, so a
crash mid-save would leave new files beside the old branch's, under a `latest` that may point
there. So rank 0 first moves `latest` back to the newest complete tag of an earlier step, then
deletes the old folder (and its `_universal` copy, built from it), before anyone writes.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from megasparse.errors import CheckpointError

LATEST = "latest"
META = "megasparse.json"
UNIVERSAL_SUFFIX = "_universal"   # stepN_universal/: DeepSpeed's universal copy of stepN (universal.py)
_TAG = re.compile(r"^step(\d{8})$")


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_latest(ckpt_dir: str, tag: str) -> None:
    _atomic_write_text(os.path.join(ckpt_dir, LATEST), tag)


def read_latest(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return fh.read().strip() or None


# ------------------------------------------------------------------ RNG

def capture_rng_state() -> dict:
    from megasparse.parallel.random import get_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    from megasparse.parallel.random import get_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        get_rng_tracker().set_states(state["tracker"])


# ------------------------------------------------------------------ save

def _step_of(tag: str) -> int:
    return int(_TAG.match(tag).group(1))


def _tags(ckpt_dir: str) -> list[str]:
    """The step folders, oldest first."""
    return sorted((t for t in os.listdir(ckpt_dir) if _TAG.match(t)), key=_step_of)


def _remove_tag(ckpt_dir: str, tag: str) -> None:
    """A step folder and the universal copy built from it (which would be stale without it)."""
    for name in (tag, tag + UNIVERSAL_SUFFIX):
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def prune_checkpoints(ckpt_dir: str, keep_last: int, keep_every: int | None) -> list[str]:
    """Delete all but the newest `keep_last` tags, never `latest`'s, keeping every step that is
    a multiple of `keep_every` for good. Returns the deleted tags."""
    latest = read_latest(ckpt_dir)
    tags = _tags(ckpt_dir)
    doomed = []
    for tag in tags[:-keep_last] if keep_last > 0 else tags:
        if tag == latest or (keep_every and _step_of(tag) % keep_every == 0):
            continue
        _remove_tag(ckpt_dir, tag)
        doomed.append(tag)
    return doomed


def clear_tag_for_save(ckpt_dir: str, tag: str) -> None:
    """Rank 0, before a save of `tag`: if the folder exists (an older branch of this run), point
    `latest` away from it first, at the newest complete tag of an earlier step (or remove `latest`
    when there is none), then delete it, so no crash can leave `latest` on a mix of two branches."""
    if not os.path.isdir(os.path.join(ckpt_dir, tag)):
        return
    if read_latest(ckpt_dir) == tag:
        complete = [t for t in _tags(ckpt_dir) if _step_of(t) < _step_of(tag)   # not an abandoned later one
                    and os.path.isfile(os.path.join(ckpt_dir, t, META))]
        if complete:
            write_latest(ckpt_dir, complete[-1])
        else:
            os.remove(os.path.join(ckpt_dir, LATEST))
    _remove_tag(ckpt_dir, tag)


def save_checkpoint(engine, ckpt_dir: str, step: int, client_state: dict, rank: int, meta: dict,
                    keep_last: int = 0, keep_every: int | None = None, rank_state: dict | None = None) -> str:
    """Save on every rank (ZeRO shards are per rank); return the tag. rank_state, if given, is
    this rank's own file (`interval_rank<r>.pt`)."""
    tag = tag_for_step(step)
    if rank == 0:
        clear_tag_for_save(ckpt_dir, tag)
    _barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    tag_dir = os.path.join(ckpt_dir, tag)
    torch.save(capture_rng_state(), os.path.join(tag_dir, f"rng_rank{rank:05d}.pt"))
    if rank_state is not None:
        torch.save(rank_state, os.path.join(tag_dir, f"interval_rank{rank:05d}.pt"))
    if rank == 0:
        _atomic_write_text(os.path.join(tag_dir, META), json.dumps(meta, indent=1))
    _barrier()
    if rank == 0:
        fsync_tree(tag_dir)
        write_latest(ckpt_dir, tag)
        if keep_last:
            prune_checkpoints(ckpt_dir, keep_last, keep_every)
    _barrier()
    return tag


# ------------------------------------------------------------------ resume

def resolve_resume(resume: str | None, ckpt_dir: str) -> tuple[str, str] | None:
    """`train.resume` -> (checkpoints folder, tag), or None to start fresh.

    "auto": `latest` in this run's checkpoints folder, or a fresh start if there is none.
    A path: a checkpoints folder (its `latest` is used) or one tag folder inside it.
    """
    if resume is None:
        return None
    if resume == "auto":
        tag = read_latest(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = os.path.abspath(resume)
    if not os.path.exists(path):
        raise CheckpointError(f"train.resume={resume}: no such file or folder; give a checkpoints folder, "
                              f"one of its step folders, or 'auto'")
    if os.path.isfile(os.path.join(path, META)):
        return os.path.dirname(path), os.path.basename(path)
    tag = read_latest(path)
    if tag is None:
        raise CheckpointError(f"train.resume={resume} holds neither '{LATEST}' nor '{META}'; point it at a "
                              f"run's checkpoints folder or at a complete step folder inside it")
    return path, tag


def read_meta(load_dir: str, tag: str) -> dict:
    path = os.path.join(load_dir, tag, META)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {os.path.join(load_dir, tag)} is incomplete (no {META}); "
                              f"it was probably interrupted mid-save: resume from an earlier step folder")
    with open(path) as fh:
        return json.load(fh)


# Model fields that must match for the weights to load; everything else may change on resume.
_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "mlp", "tie_embeddings")


def check_compatible(meta: dict, model_cfg: dict, tp: int, where: str) -> None:
    saved = meta["config"]["model"]
    for name in _SHAPE_FIELDS:
        if saved.get(name) != model_cfg.get(name):
            raise CheckpointError(f"{where} has model.{name}={saved.get(name)!r} but the config says "
                                  f"{model_cfg.get(name)!r}; set model.{name}={saved.get(name)!r} to resume it")
    if meta["tp"] != tp:
        raise CheckpointError(f"{where} was saved at parallel.tp={meta['tp']} but this run uses parallel.tp={tp}; "
                              f"reshard it first: megasparse convert {where} OUT --tp {tp}")


def load_rank_state(load_dir: str, tag: str, rank: int) -> dict | None:
    """This rank's `interval_rank<r>.pt`, or None (a checkpoint written before it existed)."""
    path = os.path.join(load_dir, tag, f"interval_rank{rank:05d}.pt")
    return torch.load(path, weights_only=False) if os.path.isfile(path) else None


def load_rng_state(load_dir: str, tag: str, rank: int, same_layout: bool) -> None:
    """Restore this rank's RNG streams when the rank layout is unchanged (else keep fresh ones:
    with another world size there is no meaningful per-rank mapping)."""
    path = os.path.join(load_dir, tag, f"rng_rank{rank:05d}.pt")
    if same_layout and os.path.isfile(path):
        restore_rng_state(torch.load(path, weights_only=False))
