"""`megasparse report RUN_DIR [--out DIR]`: sparsity plots and a markdown summary of a run."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="plots and a summary of a run's sparsity (loss, λ, nnz/token, dead neurons)",
        description="Write PNG plots over steps (loss, λ, nnz/token per layer, dead fraction), a per-layer "
                    "histogram of neuron firing rates and summary.md for a run directory.")
    p.add_argument("run_dir", help="a run directory written by `megasparse train` (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    p.set_defaults(func=run)


def run(args) -> int:
    from megasparse.sparsity.report import build_report

    result = build_report(args.run_dir, args.out)
    for path in result["plots"] + [result["summary"]]:
        print(path)
    return 0
