"""Probe: the cold walk (updown.py) under each launch config, for the hot1536 layout.

    python tools/probe_updown_configs.py   -> bench/results/probe_updown_configs_<gpu>.{json,md}

The walk is ~0.16 ms of the ~1.07 ms hot1536 FFN at M=16384, at ~6 TB/s of weight-row gathers
(the paper's per-token loop reached 7.3 TB/s). The autotuner picks among three configs found in
runs 8-9 for the all-sparse layout; this times a wider grid (entries per step, warps, prefetch)
on the cold columns of the layout the headline uses, at M=16384 and 131072, with the effective
gather bandwidth (two 2*D-byte rows per activation).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import environment, gpu_slug, median_ms, write_results  # noqa: E402
from bench_ffn_infer import make_inputs  # noqa: E402
from kernels import twell  # noqa: E402
from kernels.twell.gate import gate_twell  # noqa: E402
from kernels.twell.updown import _updown_tuned, updown  # noqa: E402

# (entries per step, warps, prefetch, entries per step of an overflowed token's walk). The first
# grid (probe_updown_configs_h100_grid1.md, all with EO 4 or 0) showed that EO changes the clean
# walk's speed too (E1 w2 pf: 0.163 ms with EO 2 against 0.222 with EO 4), so it is swept here.
CONFIGS = ([(1, w, True, eo) for w in (1, 2, 4) for eo in (0, 1, 2, 4)]
           + [(2, w, True, eo) for w in (2, 4) for eo in (0, 2)] + [(2, 1, False, 0), (2, 2, False, 0)])


def main():
    if not torch.cuda.is_available():
        sys.exit("probe_updown_configs needs CUDA")
    env, rows, n_hot = environment(), [], 1536
    for m in (16384, 131072):
        torch.manual_seed(0)
        f, x, xc = make_inputs(m, 5632, 29.0)
        w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down)
        _, fc = twell.twell_ffn(xc, w0, return_fire_counts=True)
        w = twell.calibrate(w0, fc, xc.shape[0], n_hot=n_hot)
        counts, pairs = gate_twell(x, w.w_gate, w.tile, w.cap, n_hot)
        acts = int(counts.clamp(max=w.cap).sum())
        y_ref = torch.empty_like(x)
        updown(x, w.w_gate, w.w_up, w.w_down_t, counts, pairs, y_ref, tile=w.tile, cap=w.cap, col0=n_hot)
        r = {"M": m, "cold_activations": acts,
             "autotuned_ms": median_ms(lambda: updown(x, w.w_gate, w.w_up, w.w_down_t, counts, pairs, y_ref,
                                                      tile=w.tile, cap=w.cap, col0=n_hot)),
             "autotuned_config": str(_updown_tuned.best_config), "configs": {}}
        for e, nw, pf, eo in CONFIGS:
            y = torch.empty_like(x)
            fn = lambda: updown(x, w.w_gate, w.w_up, w.w_down_t, counts, pairs, y, tile=w.tile,  # noqa: E731
                                cap=w.cap, col0=n_hot, entries=e, num_warps=nw, prefetch=pf,
                                overflow_entries=eo)
            try:
                ms = median_ms(fn)
            except Exception as ex:  # a config that does not compile is reported, not fatal
                r["configs"][f"E{e} w{nw} pf{int(pf)} EO{eo}"] = {"error": f"{type(ex).__name__}: {ex}"[:200]}
                continue
            same = bool(torch.allclose(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2))
            r["configs"][f"E{e} w{nw} pf{int(pf)} EO{eo}"] = {"ms": ms, "TBps": acts * 4 * x.shape[1] / ms / 1e9,
                                                       "matches_autotuned": same}
        rows.append(r)
        print(r, flush=True)
    md = [f"# Cold walk launch configs, hot1536 ({env.get('gpu')}, commit {env.get('git_commit')})", "",
          "E: entries per step; w: warps; pf: software-pipelined walk; EO: entries per step of a token "
          "with an overflowed tile. TB/s: two 2*D-byte weight rows "
          "per cold activation.", ""]
    for r in rows:
        md += [f"M={r['M']} ({r['cold_activations']} cold activations): autotuned {r['autotuned_ms']:.3f} ms "
               f"({r['autotuned_config']})", "", "| config | ms | TB/s |", "|---|---|---|"]
        md += [f"| {k} | {v['ms']:.3f} | {v['TBps']:.2f} |" if "ms" in v else f"| {k} | error | |"
               for k, v in r["configs"].items()]
        md.append("")
    write_results(f"probe_updown_configs_{gpu_slug()}", {"environment": env, "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
