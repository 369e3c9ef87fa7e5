"""Summarise tools/gpu_multi_runs.sh into bench/results/<stem>.json and .md.

  python tools/summarize_multi_gpu.py STEM RUN_DIR

Per run: the per-step losses (from metrics.jsonl, or the log's step lines when the metrics file
did not come back), their largest relative difference from the 1-GPU reference run, and the
median tokens/s over steps 3 onward (step 1 includes start-up; step 2 is the first warm one).
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

RUNS = {"r1_tp1": ("1", "tp=1", "reference"), "r2_tp2": ("2", "tp=2", "r1_tp1"),
        "r3_dp2": ("2", "dp=2", "r1_tp1"), "r4_resume": ("2", "tp=2, resumed at step 6", "r2_tp2"),
        "r5_tp2_hybrid": ("2", "tp=2, hybrid sparse MLP (local H=2816)", "r2_tp2")}


def load(run_dir: Path, name: str) -> dict[int, dict]:
    m = run_dir / f"{name}.metrics.jsonl"
    if m.exists():
        rows = [json.loads(line) for line in m.read_text().splitlines() if line.strip()]
        return {r["step"]: r for r in rows if r.get("split") == "train"}
    out = {}
    for line in (run_dir / f"{name}.log").read_text().splitlines():
        s = re.match(r"step (\d+) \| loss ([\d.]+) .*tok/s ([\d,]+)", line)
        if s:
            out[int(s[1])] = {"loss": float(s[2]), "tokens_per_s": float(s[3].replace(",", ""))}
    return out


def main() -> None:
    stem, run_dir = sys.argv[1], Path(sys.argv[2])
    data = {n: load(run_dir, n) for n in RUNS if (run_dir / f"{n}.log").exists()}
    res = {"gpu": (run_dir / "gpu.txt").read_text().strip().splitlines(), "runs": {}}
    lines = [f"# Multi-GPU runs ({res['gpu'][0]} x {len(res['gpu'])}), 0.5B shape, bf16, ZeRO-1, 8 x 2048 tokens per step",
             "", "| run | GPUs | layout | steps | max rel loss diff vs | tokens/s (median, step >= 3) | final loss |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in data.items():
        gpus, layout, ref = RUNS[name]
        diff = None
        if ref in data:
            common = [s for s in rows if s in data[ref]]
            diff = max(abs(rows[s]["loss"] - data[ref][s]["loss"]) / abs(data[ref][s]["loss"]) for s in common)
        tps = statistics.median(r["tokens_per_s"] for s, r in rows.items() if s >= 3)
        res["runs"][name] = {"gpus": int(gpus), "layout": layout, "ref": ref, "max_rel_loss_diff": diff,
                             "tokens_per_s": tps, "losses": {s: r["loss"] for s, r in sorted(rows.items())}}
        lines.append(f"| {name} | {gpus} | {layout} | {min(rows)}-{max(rows)} | "
                     f"{'-' if diff is None else f'{diff:.1e} ({ref})'} | {tps:,.0f} | {rows[max(rows)]['loss']:.4f} |")
    if "r1_tp1" in res["runs"]:
        one = res["runs"]["r1_tp1"]["tokens_per_s"]
        for name, label in (("r3_dp2", "DP weak-scaling efficiency (dp=2 vs 1 GPU, same per-GPU micro-batch)"),
                            ("r2_tp2", "TP efficiency (tp=2 on 2 GPUs vs 1 GPU)")):
            if name in res["runs"]:
                eff = res["runs"][name]["tokens_per_s"] / (2 * one)
                res[name + "_efficiency"] = eff
                lines.append(f"\n{label}: {eff:.1%}")
    Path(f"bench/results/{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    Path(f"bench/results/{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
