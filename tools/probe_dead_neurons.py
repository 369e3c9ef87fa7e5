"""Can a cheap, rigorous bound prove that a trained model's cold neurons stay off?

On a trained sparse model most neurons of most layers never fire (model_h100.md: 4551 of 5632 in
layer 1), yet the TwELL gate GEMM computes every one of them for every token. A neuron may only
be skipped for a token when g = x . w is *proved* <= 0, or the output changes. One proof that
costs a small GEMM: project onto the k leading directions V of the layer's inputs (calibration
tokens), and bound the rest by Cauchy-Schwarz,

    x . w = (x V)(V^T w) + x_perp . w_perp  <=  (x V)(V^T w) + ||x_perp|| ||w_perp||,

so a (token, neuron) pair is certified off when the right side is below zero. The screen is a
[tokens, k] x [k, neurons] product (k/D of the gate's FLOPs) and two norms. Whether it certifies
enough pairs depends on how far below zero the neurons sit relative to the inputs' spread, which
only a trained model can tell: this probe measures it, per layer and rank k, on held-out tokens.

    python tools/probe_dead_neurons.py --export EXPORT_DIR --data DATA_DIR

Reports (bench/results/probe_dead_neurons_<gpu>.json and .md; BENCH_RESULTS_DIR overrides), per
layer: neurons never fired on the calibration tokens, how many of them fire on held-out tokens,
and for each k, the share of (token, neuron) pairs the bound certifies off among the calibration-
dead neurons and among all cold neurons (those past the layer's TwELL n_hot), with the uncertified
pairs per token: what an exact screen-then-gather path would still have to compute.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import environment, gpu_slug, write_results  # noqa: E402

RANKS = (1, 4, 16, 64, 256)   # k = 0 is plain Cauchy-Schwarz: it never certifies (the bound is >= 0)
SAFETY = 1e-3   # certify only when the bound is below -SAFETY * ||x|| ||w||: covers fp32 rounding


def leading_directions(x: torch.Tensor) -> torch.Tensor:
    """[D, D]: the right singular vectors of the (uncentered) calibration inputs, largest first,
    so the inputs' mean direction is among the leading ones; the rank-k basis is [:, :k]."""
    _, vecs = torch.linalg.eigh(x.T @ x)      # ascending eigenvalues
    return vecs.flip(1)


@torch.no_grad()
def certified_off(x: torch.Tensor, w: torch.Tensor, v: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """[tokens, neurons] bool: the bound proves x . w <= 0 (fp32 throughout)."""
    wv = w @ v                                          # [n, k]
    w_perp = (w - wv @ v.T).norm(dim=1)                 # [n]
    w_norm = w.norm(dim=1)
    out = []
    for xs in x.split(chunk):
        xv = xs @ v
        x_perp = (xs - xv @ v.T).norm(dim=1, keepdim=True)
        bound = xv @ wv.T + x_perp * w_perp + SAFETY * xs.norm(dim=1, keepdim=True) * w_norm
        out.append(bound < 0)
    return torch.cat(out)


@torch.no_grad()
def layer_report(x_cal: torch.Tensor, x_held: torch.Tensor, w_gate: torch.Tensor, n_hot: int,
                 ranks=RANKS) -> dict:
    """The probe's numbers for one layer (inputs and weights in any dtype; computed in fp32)."""
    x_cal, x_held, w = x_cal.float(), x_held.float(), w_gate.float()
    fires_cal = (x_cal @ w.T > 0).sum(0)
    g_held = x_held @ w.T
    on_held = g_held > 0
    dead = fires_cal == 0
    cold = torch.zeros_like(dead)
    cold[n_hot:] = True
    tokens = x_held.shape[0]
    cos = (g_held[:, dead] / (x_held.norm(dim=1, keepdim=True) * w[dead].norm(dim=1))).amax(0) \
        if dead.any() else torch.zeros(0, device=w.device)
    row = {"neurons": w.shape[0], "n_hot": n_hot, "dead_on_calibration": int(dead.sum()),
           "dead_firing_on_held_out": int(on_held[:, dead].any(0).sum()),
           "dead_fires_on_held_out": int(on_held[:, dead].sum()),
           "nnz_per_token_held_out": float(on_held.sum() / tokens),
           "cold_nnz_per_token_held_out": float(on_held[:, cold].sum() / tokens),
           "dead_max_cos_quantiles": {q: float(cos.quantile(q)) for q in (0.0, 0.5, 0.9, 1.0)} if cos.numel() else {},
           "ranks": []}
    directions = leading_directions(x_cal)   # one decomposition for every rank
    for k in ranks:
        if k > x_cal.shape[1]:
            continue
        off = certified_off(x_held, w, directions[:, :k].contiguous())
        assert not (off & on_held).any(), "a certified-off pair fired: the bound is wrong"
        r = {"k": k}
        for name, mask in (("dead", dead), ("cold", cold)):
            n = int(mask.sum())
            if n:
                unc = (~off[:, mask]).sum(1).float()
                r[f"{name}_certified"] = float(off[:, mask].float().mean())
                r[f"{name}_uncertified_per_token"] = float(unc.mean())
                r[f"{name}_uncertified_per_token_p99"] = float(unc.quantile(0.99))
        row["ranks"].append(r)
    return row


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [f"# Can a low-rank bound prove cold neurons off? {env.get('gpu', 'cpu')} (commit {env.get('git_commit', '?')})",
             "", f"Model: {payload['source']}; calibration {payload['calibration_tokens']} tokens, held out "
             f"{payload['held_out_tokens']} tokens. A pair (token, neuron) is certified off when "
             "(xV)(V^T w) + |x_perp| |w_perp| < -1e-3 |x| |w|, V the top-k directions of the calibration inputs.", "",
             "| layer | n_hot | dead on cal. | of them firing held out | nnz/token (cold) | dead max cos q50 / max | "
             + " | ".join(f"k={k}: dead cert. / cold uncert. per token" for k in payload["ranks"]) + " |",
             "|" + "---|" * (6 + len(payload["ranks"]))]
    for i, row in enumerate(payload["layers"]):
        q = row["dead_max_cos_quantiles"]
        cells = [str(i), str(row["n_hot"]), str(row["dead_on_calibration"]), str(row["dead_firing_on_held_out"]),
                 f"{row['nnz_per_token_held_out']:.1f} ({row['cold_nnz_per_token_held_out']:.1f})",
                 f"{q.get(0.5, float('nan')):.3f} / {q.get(1.0, float('nan')):.3f}"]
        for r in row["ranks"]:
            cells.append(f"{r.get('dead_certified', float('nan')):.3f} / {r.get('cold_uncertified_per_token', float('nan')):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="a `megasparse export` folder of a trained sparse model")
    ap.add_argument("--data", required=True, help="a `megasparse data preprocess` folder (its valid split)")
    ap.add_argument("--calibration-tokens", type=int, default=16384)
    ap.add_argument("--held-out-tokens", type=int, default=32768)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    from bench_model import mlp_inputs, real_tokens, sparse_mlps
    from megasparse.inference import load_pretrained

    model = load_pretrained(a.export, device=a.device, dtype=torch.bfloat16, mlp_backend="torch", track_stats=False)
    cal_b, held_b = a.calibration_tokens // a.seq, a.held_out_tokens // a.seq
    ids = real_tokens(a.data, cal_b + held_b, a.seq)[:, :-1].to(a.device)

    def inputs_per_layer(rows: range) -> list[torch.Tensor]:   # 8 sequences per forward
        batches = [mlp_inputs(model, ids[i:min(i + 8, rows.stop)]) for i in range(rows.start, rows.stop, 8)]
        return [torch.cat(xs) for xs in zip(*batches)]

    x_cal, x_held = inputs_per_layer(range(0, cal_b)), inputs_per_layer(range(cal_b, cal_b + held_b))
    layers = []
    for i, mlp in enumerate(sparse_mlps(model)):
        n_hot = mlp._twell_layout.preset_n_hot or 0
        layers.append(layer_report(x_cal[i], x_held[i], mlp.gate_weight, n_hot))
        print(i, layers[-1], flush=True)
    payload = {"environment": environment(), "source": a.export, "calibration_tokens": x_cal[0].shape[0],
               "held_out_tokens": x_held[0].shape[0], "ranks": list(RANKS), "layers": layers}
    paths = write_results(f"probe_dead_neurons_{gpu_slug()}", payload, markdown(payload))
    print(markdown(payload))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
