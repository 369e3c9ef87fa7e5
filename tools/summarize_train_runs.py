"""Summarise training runs (metrics.jsonl files) into bench/results/<stem>.json and .md.

  python tools/summarize_train_runs.py STEM GPU_NAME name=path/metrics.jsonl [...]

For each run: median tokens/s, model TFLOP/s and MFU over the steady part (after the first 20%
of log intervals), split at the first interval where any layer ran the sparse kernels; the loss
around that switch; the final train CE and val loss; peak memory.
"""
from __future__ import annotations

import json
import statistics
import sys


def _median(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(path: str) -> dict:
    rows = [json.loads(line) for line in open(path)]
    train = [r for r in rows if r["split"] == "train"]
    valid = [r for r in rows if r["split"] == "valid"]
    steady = train[max(1, len(train) // 5):]
    switch = next((i for i, r in enumerate(train) if r.get("sparse_layers", 0) > 0), None)
    dense_part = steady if switch is None else [r for r in steady if r["step"] < train[switch]["step"]]
    out = {
        "steps": train[-1]["step"],
        "dense_path": {k: _median(dense_part, k) for k in ("tokens_per_s", "model_tflops", "mfu")},
        "final_ce": train[-1]["ce_loss"], "final_nnz_per_token": train[-1].get("nnz_per_token"),
        "final_val_loss": valid[-1]["val_loss"] if valid else None,
        "peak_mem_gb": max((r.get("peak_mem_gb") or 0) for r in train),
    }
    if switch is not None:
        after = [r for r in train[switch + 1:]]  # the interval that switched mixes both paths
        out["switch"] = {"step": train[switch]["step"], "nnz_per_token": train[switch]["nnz_per_token"],
                         "ce_before": train[switch - 1]["ce_loss"], "ce_at": train[switch]["ce_loss"],
                         "ce_after": train[switch + 1]["ce_loss"] if switch + 1 < len(train) else None}
        out["sparse_path"] = {k: _median(after, k) for k in ("tokens_per_s", "model_tflops", "mfu", "executed_tflops")}
        out["sparse_path"]["sparse_layers"] = after[-1]["sparse_layers"] if after else None
    return out


def main() -> None:
    stem, gpu, *runs = sys.argv[1:]
    result = {"gpu": gpu, "runs": {}}
    for item in runs:
        name, path = item.split("=", 1)
        result["runs"][name] = summarize(path)
    with open(f"bench/results/{stem}.json", "w") as fh:
        json.dump(result, fh, indent=1)
    lines = [f"# Training runs on {gpu}", "",
             "| run | steps | tokens/s (dense path) | model TFLOP/s | MFU | tokens/s (sparse path) | MFU (sparse) | "
             "switch step (nnz/token) | CE before/at/after switch | final CE | final val loss | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    for name, r in result["runs"].items():
        d, s, w = r["dense_path"], r.get("sparse_path", {}), r.get("switch")
        switch = "-" if not w else "{} ({:.1f})".format(w["step"], w["nnz_per_token"])
        around = "-" if not w else "{:.3f} / {:.3f} / {}".format(w["ce_before"], w["ce_at"], fmt(w["ce_after"], "{:.3f}"))
        lines.append(
            f"| {name} | {r['steps']} | {fmt(d['tokens_per_s'], '{:,.0f}')} | {fmt(d['model_tflops'], '{:.1f}')} | "
            f"{fmt(d['mfu'], '{:.1%}')} | {fmt(s.get('tokens_per_s'), '{:,.0f}')} | {fmt(s.get('mfu'), '{:.1%}')} | "
            f"{switch} | {around} | "
            f"{r['final_ce']:.3f} | {fmt(r['final_val_loss'], '{:.3f}')} | {r['peak_mem_gb']:.2f} |")
    with open(f"bench/results/{stem}.md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
