"""The language-model loss, torch against kernels/cross_entropy, forward+backward, one process.

    python tools/bench_cross_entropy.py [--tokens 16384] [--vocab 32768 131072]

Torch's form is what the trainer ran before: F.cross_entropy(logits.float(), labels), which casts
the bf16 logits to fp32, writes fp32 log-probabilities, a dense fp32 gradient and a bf16 copy of
it. The fused form reads the bf16 logits once forward and once backward and writes the bf16
gradient into a new buffer (the model passes inplace_backward=True and writes it over its
logits instead, which saves that 1 GB at 16k x 32k but cannot be timed on a leaf tensor). Both
are timed as loss, then backward into the logits, with do_bench (L2 flushed between calls); the
peak memory above the logits and the gradient's and loss's error against an fp64 reference are
reported beside. Results: bench/results/
cross_entropy_<gpu>.json and .md (BENCH_RESULTS_DIR overrides).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import environment, gpu_slug, median_ms, peak_mem_mib, write_results  # noqa: E402

from kernels.cross_entropy import cross_entropy  # noqa: E402


def torch_loss(logits, labels):
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def fp64_errors(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor,
                rows: int = 1024) -> tuple[float, float]:
    """(|loss - loss_ref|, ||grad - grad_ref|| / ||grad_ref||) against fp64, a block of rows at a
    time (a whole fp64 [N, V] copy would not fit at V = 131072)."""
    n = logits.shape[0]
    total, diff2, ref2 = 0.0, 0.0, 0.0
    for s in range(0, n, rows):
        z, y = logits[s:s + rows].double(), labels[s:s + rows]
        logp = torch.log_softmax(z, dim=1)
        total += float(-logp.gather(1, y[:, None]).sum())
        g = logp.exp_()
        g[torch.arange(g.shape[0], device=g.device), y] -= 1
        g /= n
        diff2 += float((grad[s:s + rows].double() - g).pow(2).sum())
        ref2 += float(g.pow(2).sum())
    return abs(float(loss.double()) - total / n), (diff2 / ref2) ** 0.5


def case(n: int, vocab: int) -> dict:
    torch.manual_seed(0)
    base = (torch.randn(n, vocab, device="cuda") * 2).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device="cuda")
    row = {"tokens": n, "vocab": vocab}
    for name, fn in (("torch", torch_loss), ("fused", cross_entropy)):
        logits = base.clone().requires_grad_()

        def fwd_bwd():
            logits.grad = None
            fn(logits, labels).backward()

        fwd_bwd()
        loss = fn(logits.detach(), labels)
        row[f"{name}_loss_abs_err"], row[f"{name}_grad_rel_err"] = fp64_errors(base, labels, loss, logits.grad)
        row[f"{name}_ms"] = median_ms(fwd_bwd)
        row[f"{name}_fwd_ms"] = median_ms(lambda: fn(logits.detach(), labels))
        logits.grad = None
        row[f"{name}_peak_extra_gb"] = peak_mem_mib(fwd_bwd) / 1024
        logits.grad = None
    row["speedup"] = row["torch_ms"] / row["fused_ms"]
    return row


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [f"# LM loss forward+backward, {env['gpu']} (commit {env.get('git_commit', '?')})", "",
             "bf16 logits; torch = F.cross_entropy(logits.float(), labels); fused = kernels/cross_entropy. "
             "ms: do_bench median (L2 flushed). Peak: memory allocated above the logits during one "
             "forward+backward. Errors against fp64.", "",
             "| tokens x vocab | torch fwd+bwd ms | fused fwd+bwd ms | speedup | fwd only torch / fused | "
             "peak GB torch / fused | grad rel err torch / fused | loss abs err torch / fused |",
             "|---|---|---|---|---|---|---|---|"]
    for r in payload["cases"]:
        lines.append(f"| {r['tokens']} x {r['vocab']} | {r['torch_ms']:.3f} | {r['fused_ms']:.3f} | "
                     f"**{r['speedup']:.2f}x** | {r['torch_fwd_ms']:.3f} / {r['fused_fwd_ms']:.3f} | "
                     f"{r['torch_peak_extra_gb']:.2f} / {r['fused_peak_extra_gb']:.2f} | "
                     f"{r['torch_grad_rel_err']:.1e} / {r['fused_grad_rel_err']:.1e} | "
                     f"{r['torch_loss_abs_err']:.1e} / {r['fused_loss_abs_err']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cross_entropy needs a CUDA GPU")
    payload = {"environment": environment(), "cases": [case(a.tokens, v) for v in a.vocab]}
    paths = write_results(f"cross_entropy_{gpu_slug()}", payload, markdown(payload))
    print(markdown(payload))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
