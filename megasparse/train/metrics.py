"""One record per log interval, written to three sinks: a console line, tensorboard
(`<run>/tb/`), and `<run>/metrics.jsonl` (one JSON object per line). Rank 0 only."""
from __future__ import annotations

import json
import math
import os
import sys

# Console columns in order: (key, label, format).
_CONSOLE = [
    ("step", "step", "{:d}"), ("loss", "loss", "{:.4f}"), ("ce_loss", "ce", "{:.4f}"),
    ("l1_term", "l1", "{:.3f}"), ("l1_coeff", "λ", "{:.2e}"), ("nnz_per_token", "nnz/tok", "{:.1f}"),
    ("dead_fraction", "dead", "{:.1%}"), ("lr", "lr", "{:.2e}"), ("grad_norm", "gnorm", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:,.0f}"), ("model_tflops", "TFLOP/s", "{:.2f}"), ("mfu", "MFU", "{:.1%}"),
    ("peak_mem_gb", "mem", "{:.2f}GB"),
]


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(run_dir, "tb"))

    def log(self, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        step = record["step"]
        with open(self.jsonl_path, "a") as fh:
            fh.write(json.dumps({"split": prefix, **record}) + "\n")
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)
            elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
                for i, v in enumerate(value):  # per-layer series, e.g. nnz_per_token_layer
                    self._writer.add_scalar(f"{prefix}/{key}/{i}", v, step)
        self._writer.flush()
        if prefix == "train":
            line = " | ".join(f"{label} {_fmt(record.get(key), fmt)}" for key, label, fmt in _CONSOLE
                              if key in record)
        else:
            line = f"[{prefix}] step {step} | " + " | ".join(
                f"{k} {_fmt(v, '{:.4f}')}" for k, v in record.items() if k != "step" and not isinstance(v, list))
        print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
