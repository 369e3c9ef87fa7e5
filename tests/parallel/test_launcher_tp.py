"""`launch/train.sh --num_gpus 4 configs/demo.yaml parallel.tp=2` trains on CPU over gloo:
the deepspeed launcher starts 4 ranks, TP=2 x DP=2.

The demo's micro-batch (8) times DP (2) divides its global batch (16); eval is cut to one batch.
"""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_launcher_runs_demo_at_tp2_dp2(tmp_path):
    run_dir = tmp_path / "demo_tp2"
    cmd = ["bash", "launch/train.sh", "--num_gpus", "4", "configs/demo.yaml", "parallel.tp=2",
           "train.max_steps=3", "train.eval_iters=1", f"train.run_dir={run_dir}",
           "train.progress_bar=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(run_dir / "metrics.jsonl") as fh:
        train = [r for r in map(json.loads, fh) if r.get("split", "train") == "train" and "loss" in r]
    assert train[-1]["step"] == 3 and math.isfinite(train[-1]["loss"])
    assert train[-1]["grad_norm"] is not None and math.isfinite(train[-1]["grad_norm"])
    # DeepSpeed wrote one model-parallel shard per TP rank (mpu.get_model_parallel_rank()).
    ckpt = run_dir / "checkpoints" / "step00000003"
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= set(os.listdir(ckpt))
