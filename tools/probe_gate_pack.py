"""Probe: the fused gate+pack kernel against cuBLAS gate + separate pack (gate.gate_twell impls).

    python tools/probe_gate_pack.py   -> bench/results/probe_gate_pack_<gpu>.{json,md}

Same generator and timing as tools/bench_ffn_infer.py (BENCHMARKS.md shapes, nnz 29, do_bench
medians). For M=16384 and 131072 and the sparse columns of the all-sparse (col0=0) and hot1536
(col0=1536) layouts it times: the fused kernel (tma_persist, epilogue 3), its GEMM floor
(epilogue 2, counts only), cuBLAS x W^T alone, the pack kernel alone, and cuBLAS + pack for
several row-chunk sizes (the chunk bounds the dense buffer; small chunks may keep it in L2).
Both paths must give the same counts (within gates that round to 0 differently).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import environment, gpu_slug, median_ms, write_results  # noqa: E402
from kernels.synthetic import make_ffn_inputs  # noqa: E402
from kernels.twell.gate import gate_twell  # noqa: E402
from kernels.twell.pack import _pack_kernel, pack_twell  # noqa: E402

CHUNKS = (2048, 4096, 8192, 16384, 32768)
# pack launch configs timed one by one at M=16384: (BM, warps, epilogue, slot block); epilogue
# 2 writes counts only (the floor of a pass that reads g once), 0 is the scan, 4 the bitmask select
PACK_SWEEP = ([(bm, w, epi, 8) for bm, w in ((16, 4), (32, 4)) for epi in (2, 0)]
              + [(bm, w, 4, sb) for bm, w in ((16, 4), (32, 4), (32, 8), (64, 8)) for sb in (4, 8)])


def pack_sweep(g, cnt, prs, tile, cap):
    out = {}
    for bm, w, epi, sb in PACK_SWEEP:
        out[f"BM{bm} w{w} epi{epi} sb{sb}"] = median_ms(lambda: pack_twell(
            g, cnt, prs, tile, cap, epilogue=epi, block_rows=bm, slot_block=sb, num_warps=w))
    return out


def main():
    if not torch.cuda.is_available():
        sys.exit("probe_gate_pack needs CUDA")
    env, rows = environment(), []
    tile, cap = 128, 32
    for m in (16384, 131072):
        torch.manual_seed(0)
        f = make_ffn_inputs(m, 2048, 5632, target_nnz=29.0, device="cuda", seed=0)
        x, wg = f.x, f.w_gate
        for col0 in (0, 1536):
            w = wg[col0:]
            r = {"M": m, "col0": col0, "cols": w.shape[0]}
            c_f, _ = gate_twell(x, wg, tile, cap, col0=col0, impl="tma_persist")
            c_c, _ = gate_twell(x, wg, tile, cap, col0=col0, impl="cublas")
            r["counts_differ"] = int((c_f != c_c).sum())
            r["fused_ms"] = median_ms(lambda: gate_twell(x, wg, tile, cap, col0=col0, impl="tma_persist"))
            r["fused_gemm_floor_ms"] = median_ms(lambda: gate_twell(x, wg, tile, cap, col0=col0, epilogue=2,
                                                                    impl="tma_persist"))
            g = F.linear(x[:16384], w)
            r["cublas_gemm_16384_rows_ms"] = median_ms(lambda: F.linear(x[:16384], w))
            cnt = torch.empty(16384, c_f.shape[1], dtype=torch.int32, device="cuda")
            prs = torch.empty(16384, c_f.shape[1], cap, dtype=torch.int32, device="cuda")
            r["pack_16384_rows_ms"] = median_ms(lambda: pack_twell(g, cnt, prs, tile, cap))
            r["pack_config"] = str(_pack_kernel.best_config)
            if m == 16384:
                r["pack_sweep_ms"] = pack_sweep(g, cnt, prs, tile, cap)
            for ch in CHUNKS:
                if ch <= m:
                    r[f"cublas_pack_chunk{ch}_ms"] = median_ms(
                        lambda: gate_twell(x, wg, tile, cap, col0=col0, impl="cublas", chunk_rows=ch))
            rows.append(r)
            print(r, flush=True)
        del f, x, wg
        torch.cuda.empty_cache()
    lines = [f"# Gate + TwELL pack: fused epilogue vs cuBLAS + pack kernel ({env.get('gpu')})", "",
             f"torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}. D=2048, H=5632, nnz 29, "
             "tile 128, cap 32; do_bench medians in ms. `cols` = sparse columns packed.", "",
             "| M | cols | fused | fused GEMM floor | cuBLAS GEMM per 16384 rows | pack per 16384 rows | "
             + " | ".join(f"cuBLAS+pack, chunk {c}" for c in CHUNKS) + " | counts differ |",
             "|---|---|---|---|---|---|" + "---|" * len(CHUNKS) + "---|"]
    for r in rows:
        lines.append(f"| {r['M']} | {r['cols']} | {r['fused_ms']:.3f} | {r['fused_gemm_floor_ms']:.3f} | "
                     f"{r['cublas_gemm_16384_rows_ms']:.3f} | {r['pack_16384_rows_ms']:.3f} | "
                     + " | ".join(f"{r[f'cublas_pack_chunk{c}_ms']:.3f}" if f"cublas_pack_chunk{c}_ms" in r
                                  else "-" for c in CHUNKS) + f" | {r['counts_differ']} |")
    lines += ["", "Pack configs chosen: " + "; ".join(f"M={r['M']} cols={r['cols']}: {r['pack_config']}"
                                                     for r in rows)]
    lines += ["", "Pack launch configs at M=16384 (ms; epi 2 = counts only, 0 = scan, 4 = bitmask select):"]
    lines += [f"- cols={r['cols']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["pack_sweep_ms"].items())
              for r in rows if "pack_sweep_ms" in r]
    md = "\n".join(lines)
    jp, mp = write_results(f"probe_gate_pack_{gpu_slug()}", {"environment": env, "rows": rows}, md)
    print(md)
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
