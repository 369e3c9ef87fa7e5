"""Shared helpers for the kernel benchmarks (tools/bench_ffn_infer.py, tools/bench_ffn_train.py).

Everything here follows ../shared/BENCHMARKS.md: speed is a ratio against dense measured in one
process on one GPU; each result records the environment (GPU, torch, triton, git commit), the
measured sparsity and the error against an fp32 reference. Helpers are generic: they know nothing
about TwELL or the hybrid format. Stable API (other benchmarks import it):

    environment() -> dict            gpu_slug() -> str
    median_ms(fn) -> float           energy_joules_per_call(fn, seconds=3.0) -> dict | None
    graph_replay_ms(fn) -> (ms, out) fn's GPU time replayed from a CUDA graph
    busy_issue_ms(fn, n) -> [ms]     host issue time per call while the GPU is busy
    activation_stats(x, w_gate, tile=128) -> dict
    rel_err(out, ref) -> float       write_results(stem, payload, markdown) -> (json_path, md_path)
    peak_mem_mib(step) -> float      MiB step() allocates at its peak, above the memory before it
    add_ffn_case_args(parser, steps) ffn_training_case(args) -> (params, dy)   (the probes' case)
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"


def _git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):  # the device machine's copy of the tree has no .git
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:  # the device machine's copy may not carry .git
        return os.environ.get("GIT_COMMIT", "unknown")


def environment() -> dict:
    """What a result file must record to be comparable: GPU, versions, commit, time."""
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}")
        try:
            env["driver"] = _nvml_handle()[0].nvmlSystemGetDriverVersion()
        except Exception:
            pass
    else:
        env["gpu"] = None
    return env


def gpu_slug() -> str:
    """File-name-safe GPU name, e.g. 'h100' for 'NVIDIA H100 80GB HBM3', 'cpu' without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def median_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median time of fn() in ms with triton.testing.do_bench (events, L2 flushed between runs)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_replay_ms(fn, warmup_calls: int = 3, setup=None):
    """(median ms, output) of fn(*setup()) replayed from a CUDA graph: its GPU time without the
    host's launch cost. Captured once after warm-up calls on a side stream (as torch asks), so
    autotuners have settled before the capture. setup, if given, runs first on that stream and
    returns fn's arguments (autograd leaves must be made on the stream that captures them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        args = setup() if setup is not None else ()
        for _ in range(warmup_calls):
            fn(*args)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    ms = median_ms(graph.replay)
    del graph
    return ms, out


def busy_issue_ms(fn, n: int) -> list[float]:
    """Host ms of each of n calls of fn while the GPU is ~0.5 s behind: nothing can wait on a
    result, so a slow call blocks on something (an allocation or a sync) or on its own issue
    cost, not on the GPU's pace."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1e9))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    return times


def _nvml_handle():
    import pynvml  # provided by nvidia-ml-py
    pynvml.nvmlInit()
    idx = torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        try:
            idx = int(visible.split(",")[idx])
        except ValueError:
            pass
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(idx)


def energy_joules_per_call(fn, seconds: float = 3.0) -> dict | None:
    """Joules per call from NVML's total-energy counter over a loop of at least `seconds`.

    The call count is sized from a short timing so the loop lasts >= seconds. Returns None when
    NVML (or its energy counter) is unavailable, never a made-up number.
    """
    try:
        pynvml, h = _nvml_handle()
        pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    except Exception as e:  # noqa: BLE001 - report why, not crash the benchmark
        return {"error": f"NVML energy counter unavailable: {e}"}
    fn(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    per_call = max((time.perf_counter() - t0) / 5, 1e-6)
    calls = max(10, int(seconds / per_call) + 1)
    torch.cuda.synchronize()
    e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)  # millijoules
    t0 = time.perf_counter()
    done, batch = 0, calls
    while True:  # the first estimate can be short (warm-up, clocks): extend until >= seconds
        for _ in range(batch):
            fn()
        torch.cuda.synchronize()
        done += batch
        wall = time.perf_counter() - t0
        if wall >= seconds:
            break
        batch = max(1, int((seconds - wall) / (wall / done)) + 1)
    e1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    joules = (e1 - e0) / 1000.0
    return {"joules_per_call": joules / done, "calls": done, "seconds": wall, "mean_watts": joules / wall}


@torch.no_grad()
def activation_stats(x: torch.Tensor, w_gate: torch.Tensor, tile: int = 128, chunk: int = 8192) -> dict:
    """Measured sparsity of relu(x w_gate^T): nnz/token mean and max, largest nnz in one
    (token, tile of `tile` columns), busiest neuron's firing rate, dead-neuron fraction.

    Computed in chunks of tokens so the dense gate never has to fit in memory at once.
    """
    m, h = x.shape[0], w_gate.shape[0]
    n_tiles = -(-h // tile)
    fires = torch.zeros(h, dtype=torch.float64, device=x.device)
    total, row_max, tile_max = 0, 0, 0
    for s in range(0, m, chunk):
        nz = (x[s:s + chunk] @ w_gate.t()) > 0
        per_row = nz.sum(1)
        total += int(per_row.sum())
        row_max = max(row_max, int(per_row.max()))
        pad = torch.nn.functional.pad(nz, (0, n_tiles * tile - h))
        tile_max = max(tile_max, int(pad.view(nz.shape[0], n_tiles, tile).sum(2).max()))
        fires += nz.sum(0, dtype=torch.float64)
    rate = fires / m
    return {"nnz_mean": total / m, "nnz_max": row_max, "tile": tile, "tile_nnz_max": tile_max,
            "busiest_neuron_rate": float(rate.max()), "dead_fraction": float((fires == 0).double().mean())}


def peak_mem_mib(step) -> float:
    """MiB allocated by step() at its peak, above what was allocated before it (its result is
    held until the peak is read)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def write_results(stem: str, payload: dict, markdown: str, results_dir: str | Path | None = None):
    """Write <results_dir>/<stem>.json and <stem>.md; return both paths.

    Set BENCH_RESULTS_DIR to redirect (e.g. to $OUT on the device machine).
    """
    d = Path(results_dir or os.environ.get("BENCH_RESULTS_DIR") or RESULTS_DIR)
    d.mkdir(parents=True, exist_ok=True)
    jp, mp = d / f"{stem}.json", d / f"{stem}.md"
    jp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    mp.write_text(markdown.rstrip() + "\n")
    return jp, mp


def add_ffn_case_args(ap, steps: int) -> None:
    """--M --D --H --nnz --steps: one FFN case of BENCHMARKS.md (default: the main training case)."""
    ap.add_argument("--M", type=int, default=16384)
    ap.add_argument("--D", type=int, default=2048)
    ap.add_argument("--H", type=int, default=5632)
    ap.add_argument("--nnz", type=float, default=29.0)
    ap.add_argument("--steps", type=int, default=steps)


def ffn_training_case(args):
    """(params [x, W_g, W_u, W_d] bf16 CUDA with requires_grad, dy) from BENCHMARKS.md's generator."""
    from kernels.synthetic import make_ffn_inputs
    inp = make_ffn_inputs(args.M, args.D, args.H, target_nnz=args.nnz, device="cuda", dtype=torch.bfloat16)
    params = [t.requires_grad_() for t in (inp.x, inp.w_gate, inp.w_up, inp.w_down)]
    return params, torch.randn(args.M, args.D, device="cuda", dtype=torch.bfloat16)
