"""Helpers for tests that run the real trainer in subprocesses (single process, torchrun, deepspeed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model small enough that a multi-process CPU run takes seconds, on the real bundled data.
TINY = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_hidden=64", "model.max_seq_len=32", "data.seq_len=32", "train.dtype=fp32",
        "optim.warmup_steps=2", "train.log_interval=1", "train.eval_interval=1000", "train.eval_iters=1",
        "train.save_interval=1000", "sparsity.l1_coeff=0.01", "train.progress_bar=false"]


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=REPO + os.pathsep + e.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def train_cmd(run_dir, *overrides) -> list[str]:
    return [sys.executable, "-m", "megasparse.cli", "train", "configs/demo.yaml", *TINY,
            f"train.run_dir={run_dir}", *overrides]


def torchrun_cmd(nproc: int, run_dir, *overrides) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(_port()), "-m", "megasparse.cli", "train", "configs/demo.yaml", *TINY, f"train.run_dir={run_dir}",
            *overrides]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir, split: str = "train") -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["split"] == split]


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
