"""Build a sparsity report for a run directory: PNG plots over steps, a per-layer histogram of
neuron firing rates, and a markdown summary. Reads only files the trainer writes
(`metrics.jsonl` and `sparsity/firing_step*.npz`), so it works on a finished or a running run.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from megasparse.errors import MegasparseError
from megasparse.sparsity.firing import list_firing_files, load_firing_rates


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(train records, valid records) from metrics.jsonl, in file order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise MegasparseError(f"no metrics.jsonl in '{run_dir}'; pass a run directory written by "
                              f"`megasparse train` (e.g. runs/demo)")
    train, valid = [], []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            (valid if rec.get("split") == "valid" else train).append(rec)
    return train, valid


def _series(records: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _layer_series(records: list[dict], key: str) -> tuple[list[int], np.ndarray]:
    rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), list) and r[key]]
    if not rows:
        return [], np.zeros((0, 0))
    width = min(len(v) for _, v in rows)
    return [s for s, _ in rows], np.array([v[:width] for _, v in rows], dtype=float)


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # headless: report runs on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.grid(alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, ax, path: str, xlabel="step", ylabel=""):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_over_steps(train: list[dict], valid: list[dict], out_dir: str) -> list[str]:
    paths = []
    plt, fig, ax = _figure()
    for key, label in (("loss", "train loss (ce + λ·l1)"), ("ce_loss", "train ce")):
        ax.plot(*_series(train, key), label=label)
    ax.plot(*_series(valid, "val_loss"), "o-", label="val loss")
    ax.set_title("loss")
    paths.append(_save(plt, fig, ax, os.path.join(out_dir, "loss.png"), ylabel="loss"))

    plt, fig, ax = _figure()
    steps, lam = _series(train, "l1_coeff")
    ax.plot(steps, lam, label="λ (l1_coeff)")
    if any(v > 0 for v in lam):
        ax.set_yscale("symlog", linthresh=max(min(v for v in lam if v > 0), 1e-8))
    ax.set_title("L1 coefficient λ")
    paths.append(_save(plt, fig, ax, os.path.join(out_dir, "lambda.png"), ylabel="λ"))

    plt, fig, ax = _figure()
    steps, nnz = _layer_series(train, "nnz_per_token_layer")
    for layer in range(nnz.shape[1]):
        ax.plot(steps, nnz[:, layer], label=f"layer {layer}")
    t_steps, target = _series(train, "nnz_target")
    if target:
        ax.plot(t_steps, target, "k--", label="target")
    if nnz.size and (nnz > 0).any():
        ax.set_yscale("log")
    ax.set_title("nonzeros per token (mean over tokens)")
    paths.append(_save(plt, fig, ax, os.path.join(out_dir, "nnz_per_token.png"), ylabel="nnz / token"))

    plt, fig, ax = _figure()
    steps, dead = _layer_series(train, "dead_fraction_layer")
    for layer in range(dead.shape[1]):
        ax.plot(steps, dead[:, layer], label=f"layer {layer}")
    ax.set_title("dead neurons (no firing in the statistics window)")
    paths.append(_save(plt, fig, ax, os.path.join(out_dir, "dead_fraction.png"), ylabel="fraction of H"))
    return paths


def plot_firing_histogram(rates: np.ndarray, step: int, out_dir: str) -> str:
    """One panel per layer: histogram of log10 firing rate; dead neurons (rate 0) counted apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = rates.shape[0]
    cols = min(n_layers, 4)
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    positive = rates[rates > 0]
    lo = math.floor(math.log10(positive.min())) if positive.size else -6
    bins = np.linspace(lo, 0, 30)
    for layer in range(n_layers):
        ax = axes[layer // cols][layer % cols]
        r = rates[layer]
        ax.hist(np.log10(r[r > 0]), bins=bins, color="C0")
        ax.set_title(f"layer {layer}: {int((r == 0).sum())} dead of {r.size}", fontsize=9)
        ax.set_xlabel("log10 firing rate", fontsize=8)
    for k in range(n_layers, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"neuron firing rates, window ending at step {step}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "firing_rates_hist.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v, spec=".4g") -> str:
    return "-" if v is None else format(v, spec)


def summary_markdown(run_dir: str, train: list[dict], valid: list[dict], firing: dict | None) -> str:
    last = train[-1] if train else {}
    lines = [f"# Sparsity report: `{run_dir}`", ""]
    lines += ["| metric | value |", "|---|---|"]
    rows = [("steps", last.get("step")), ("train loss", last.get("loss")), ("train ce", last.get("ce_loss")),
            ("val loss", valid[-1]["val_loss"] if valid else None), ("λ (last)", last.get("l1_coeff")),
            ("nnz / token (mean over layers)", last.get("nnz_per_token")), ("nnz target", last.get("nnz_target")),
            ("nnz max / token", last.get("nnz_max")), ("dead fraction", last.get("dead_fraction"))]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]
    lines += ["", "## Per layer (last log interval)", ""]
    header = "| layer | nnz/token | nnz % of H | nnz max | dead % | L1 term | median firing rate |"
    lines += [header, "|---|---|---|---|---|---|---|"]
    n_layers = len(last.get("nnz_per_token_layer") or last.get("l1_layer") or [])
    for i in range(n_layers):
        def at(key, scale=1.0, spec=".4g"):
            vals = last.get(key)
            return _fmt(vals[i] * scale, spec) if vals and i < len(vals) else "-"
        median = "-"
        if firing is not None and i < firing["rates"].shape[0]:
            median = _fmt(float(np.median(firing["rates"][i])))
        lines.append(f"| {i} | {at('nnz_per_token_layer')} | {at('nnz_fraction_layer', 100, '.2f')} | "
                     f"{at('nnz_max_layer')} | {at('dead_fraction_layer', 100, '.1f')} | {at('l1_layer')} | {median} |")
    lines.append("")
    return "\n".join(lines)


def build_report(run_dir: str, out_dir: str | None = None) -> dict:
    """Write plots and summary.md under ``out_dir`` (default ``RUN_DIR/report``); return paths."""
    out_dir = out_dir or os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    train, valid = read_metrics(run_dir)
    plots = plot_over_steps(train, valid, out_dir)
    files = list_firing_files(run_dir)
    firing = load_firing_rates(files[-1][1]) if files else None
    if firing is not None:
        plots.append(plot_firing_histogram(firing["rates"], firing["step"], out_dir))
    summary = os.path.join(out_dir, "summary.md")
    with open(summary, "w") as fh:
        fh.write(summary_markdown(run_dir, train, valid, firing))
    return {"out_dir": out_dir, "plots": plots, "summary": summary}
