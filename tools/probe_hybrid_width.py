"""Why the hybrid training MLP falls off a cliff on some layers of a trained model, and whether a
wider ELL fixes it. One process, one GPU.

    python tools/probe_hybrid_width.py EXPORT_DIR --data DATA_DIR [--widths 256 512 1024 2048]

kernels.hybrid packs up to `ell_width` nonzeros per token (hot and cold alike) and sends heavier
tokens to a dense backup that recomputes them from all of W_g and W_u (exact but slow, ~1 ms per
kernel with a few such tokens; kernels/hybrid/NOTES.md). A trained layer with a mean of 128
nonzeros per token has many tokens over 256. For each layer, on the input it really gets, this
times forward+backward (backend_calibration.time_forward_backward_ms, the trainer's own
measurement) of the dense torch MLP and of the hybrid kernels at each ELL width, and counts the
tokens over each width. Writes bench/results/probe_hybrid_width_<gpu>.json and .md.
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import environment, gpu_slug, write_results  # noqa: E402
from bench_model import add_model_and_data_args, mlp_inputs, real_tokens, sparse_mlps  # noqa: E402

from megasparse.model.backend_calibration import time_forward_backward_ms  # noqa: E402
from megasparse.model.sparse_mlp import _hybrid_forward, torch_gated_mlp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_args(ap)
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_hybrid_width needs a CUDA GPU")
    from megasparse.inference import load_pretrained
    env = environment()
    model = load_pretrained(a.model, device="cuda", dtype=torch.bfloat16, mlp_backend="torch", track_stats=False)
    ids = real_tokens(a.data, a.batch, a.seq).cuda()[:, :-1].contiguous()
    rows = []
    for i, (mlp, x) in enumerate(zip(sparse_mlps(model), mlp_inputs(model, ids))):
        w = [mlp.gate_weight, mlp.up_weight, mlp.down_weight]
        with torch.no_grad():
            per_token = torch_gated_mlp(x, *w).token_nnz
        row = {"layer": i, "nnz_mean": per_token.float().mean().item(), "nnz_max": int(per_token.max()),
               "dense_ms": time_forward_backward_ms(torch_gated_mlp, x, w, 2, a.iters), "hybrid": {}}
        for width in a.widths:
            row["hybrid"][width] = {"ms": time_forward_backward_ms(partial(_hybrid_forward, ell_width=width), x, w,
                                                                   2, a.iters),
                                    "tokens_over": int((per_token > width).sum())}
        rows.append(row)
        print(row, flush=True)
    lines = [f"# Hybrid fwd+bwd against the ELL width, per layer of a trained model ({env['gpu']}, "
             f"commit {env.get('git_commit')})", "", f"Model {a.model}; {ids.numel()} tokens of real text; ms = median "
             f"of {a.iters} forward+backward calls (the trainer's calibration measurement).", "",
             "| layer | nnz/token mean / max | dense ms | " + " | ".join(f"W={w}: ms (tokens over W)" for w in a.widths) + " |",
             "|---|---|---|" + "---|" * len(a.widths)]
    for r in rows:
        cells = " | ".join(f"{r['hybrid'][w]['ms']:.2f} ({r['hybrid'][w]['tokens_over']})" for w in a.widths)
        lines.append(f"| {r['layer']} | {r['nnz_mean']:.1f} / {r['nnz_max']} | {r['dense_ms']:.2f} | {cells} |")
    md = "\n".join(lines) + "\n"
    print(md)
    print("wrote", *write_results(f"probe_hybrid_width_{gpu_slug()}", {"environment": env, "rows": rows}, md))


if __name__ == "__main__":
    main()
