#!/usr/bin/env python3
"""Does a training run's logged val loss match its checkpoint evaluated on the dense torch path?

    python tools/check_eval_backends.py RUN_DIR [--out FILE.json] [key.sub=value ...]

Resumes RUN_DIR's latest checkpoint into a fresh Trainer (its own scratch run folder, so the run
is left as it was) and runs Trainer.evaluate twice on the same held-out batches: with the run's
model.mlp_backend (on CUDA, `auto` serves eval through the twell layouts) and with every MLP on
`torch`. Prints both beside the val loss the training logged at that step.

Why: the twell eval layouts cache their own weight copies, and DeepSpeed's steps move no version
counter, so before Trainer.evaluate called weights_updated() every eval after a run's first used
stale MLP weights (twell NOTES.md run 17). With the fix, the three numbers agree to bf16 noise;
without it, the logged one would not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megasparse.config import load_config  # noqa: E402
from megasparse.model.sparse_mlp import ReluGatedMLP  # noqa: E402
from megasparse.train.loop import Trainer  # noqa: E402


def logged_val_loss(run_dir: str, step: int) -> float | None:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    found = None
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("split") == "valid" and rec.get("step") == step:
                found = rec["val_loss"]
    return found


def backends_used(model) -> list[str]:
    return [m.last_backend for m in model.modules() if isinstance(m, ReluGatedMLP)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", help="also write the result here as JSON")
    ap.add_argument("overrides", nargs="*", help="config overrides for the evaluation, e.g. train.eval_iters=4")
    args = ap.parse_args()
    config = os.path.join(args.run_dir, "config.yaml")
    scratch = tempfile.mkdtemp(prefix="check_eval_")
    cfg = load_config(config, [f"train.resume={os.path.join(args.run_dir, 'checkpoints')}",
                               f"train.run_dir={scratch}", *args.overrides])
    trainer = Trainer(cfg)
    model = trainer.engine.module
    out = {"run_dir": args.run_dir, "step": trainer.step, "configured_backend": cfg.model.mlp_backend,
           "logged_val_loss": logged_val_loss(args.run_dir, trainer.step)}
    out["configured_val_loss"] = trainer.evaluate()["val_loss"]
    out["configured_backends_used"] = backends_used(model)
    for m in model.modules():
        if isinstance(m, ReluGatedMLP):
            m.backend = "torch"
    out["torch_val_loss"] = trainer.evaluate()["val_loss"]
    out["torch_backends_used"] = backends_used(model)
    trainer.shutdown()
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
