"""Per-neuron firing rates on disk: `<run_dir>/sparsity/firing_step<NNNNNNNN>.npz`.

Written by the trainer at save intervals (rank 0; the rates are gathered over TP first), read by
`megasparse report`. Each file holds ``rates`` [n_layers, H] (fraction of the window's tokens on
which the neuron fired), ``step`` and ``window_tokens``.
"""
from __future__ import annotations

import glob
import os
import re

import numpy as np

SUBDIR = "sparsity"
_PATTERN = re.compile(r"firing_step(\d+)\.npz$")


def firing_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, SUBDIR, f"firing_step{step:08d}.npz")


def save_firing_rates(run_dir: str, step: int, rates, window_tokens: int) -> str:
    path = firing_path(run_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, rates=np.asarray(rates, dtype=np.float32), step=step, window_tokens=window_tokens)
    os.replace(tmp, path)  # a reader never sees a half-written file
    return path


def list_firing_files(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) pairs sorted by step."""
    out = []
    for path in glob.glob(os.path.join(run_dir, SUBDIR, "firing_step*.npz")):
        m = _PATTERN.search(os.path.basename(path))
        if m:
            out.append((int(m.group(1)), path))
    return sorted(out)


def load_firing_rates(path: str) -> dict:
    with np.load(path) as data:
        return {"rates": data["rates"], "step": int(data["step"]), "window_tokens": int(data["window_tokens"])}


def dump_window_firing_rates(run_dir: str, step: int, stats, tp_group, is_main: bool) -> str | None:
    """Gather the statistics window's firing rates over TP (every rank calls: a collective) and
    write them on the main rank. Nothing is written before the first window has any tokens."""
    if stats.window_token_count == 0:
        return None
    rates = stats.firing_rates(tp_group)
    if not is_main:
        return None
    return save_firing_rates(run_dir, step, rates.numpy(), stats.window_token_count)
