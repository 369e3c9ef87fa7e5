"""`train.profile_steps`: run a few training steps under the torch profiler and say where the
time went (what Megatron's --profile and torchtitan's enable_profiling give their users).

For the steps first..last (as the log numbers them), rank 0 writes to `<run>/profile/`:
- `steps<first>-<last>.trace.json`: a Chrome / Perfetto trace of CPU ops and GPU kernels;
- `steps<first>-<last>.json` and `.md`: a summary, the part that answers "why is the trainer slower
  than its kernels": wall time per step, the GPU's busy time (the union of kernel intervals, so
  overlapping streams are not counted twice) and idle share, host syncs per step (a D2H copy such
  as `.item()` stops the host from queueing ahead of the GPU), and the top GPU kernels and host ops.
Other ranks profile too (the collectives must stay matched) but write nothing.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from contextlib import nullcontext

import torch
from torch.profiler import record_function

PHASE_PREFIX = "megasparse."   # record_function names the training step marks its phases with
_NO_PHASE = nullcontext()


def phase(name: str):
    """Mark a phase of the training step (PHASE_PREFIX + name) for the profiler: a record_function
    while a torch profiler records (train.profile_steps or the user's own), else nothing. An idle
    record_function still costs ~10 us of host time, five of them per micro-batch."""
    if torch._C._autograd._profiler_enabled():
        return record_function(PHASE_PREFIX + name)
    return _NO_PHASE
# Host-side calls that wait for the GPU: each one drains the launch queue.
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")


class StepProfiler:
    def __init__(self, steps: list[int] | None, run_dir: str, device: torch.device, is_main: bool):
        self.first, self.last = (steps if steps else (None, None))
        self.out_dir = os.path.join(run_dir, "profile")
        self.device = device
        self.is_main = is_main
        self._prof = None
        self._t0 = 0.0

    def check_window(self, next_step: int) -> None:
        """A window whose start this run has already passed (a resume, e.g. after pre-emption, with
        the same config) is skipped with a note. (A window past train.max_steps is refused by the
        config itself.)"""
        if self.first is None:
            return
        if next_step > self.first:
            if self.is_main:
                print(f"train.profile_steps=[{self.first}, {self.last}]: this run starts at step {next_step}, "
                      f"past the window's start; not profiling", flush=True)
            self.first = self.last = None

    def before_step(self, step: int) -> None:
        """Called with the number of the step about to run (1-based)."""
        if self.first is None or step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def after_step(self, step: int) -> str | None:
        """Called with the number of the step just finished; returns the summary path when it ends
        the profiled window (rank 0)."""
        if self._prof is None or step != self.last:
            return None
        return self._finish()

    def close(self, last_done: int) -> str | None:
        """End a window the run left early (a stop signal, an error): write what was recorded of
        the steps completed in it, if any."""
        if self._prof is None:
            return None
        try:
            if last_done < self.first:
                self._prof.__exit__(None, None, None)
                self._prof = None
                return None
            self.last = last_done
            return self._finish()
        except Exception as err:   # never mask the error that ended the run
            self._prof = None
            print(f"train.profile_steps: the cut-short profile was not written ({err})", flush=True)
            return None

    def _finish(self) -> str | None:
        """Stop the profiler and write the trace and summary of steps first..last (rank 0)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall_ms = (time.perf_counter() - self._t0) * 1e3
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        if not self.is_main:
            return None
        os.makedirs(self.out_dir, exist_ok=True)
        stem = os.path.join(self.out_dir, f"steps{self.first}-{self.last}")
        prof.export_chrome_trace(stem + ".trace.json")
        summary = summarize(prof, wall_ms, self.last - self.first + 1)
        with open(stem + ".json", "w") as fh:
            json.dump(summary, fh, indent=2)
        with open(stem + ".md", "w") as fh:
            fh.write(markdown(summary) + "\n")
        print(f"profiled steps {self.first}-{self.last}: {summary['wall_ms_per_step']:.1f} ms/step, GPU busy "
              f"{_pct(summary['gpu_busy_fraction'])}, {summary['host_syncs_per_step']:.1f} host syncs/step -> {stem}.md",
              flush=True)
        return stem + ".md"


def _is_gpu(evt) -> bool:
    """A kernel, memcpy or memset on the GPU (not a user annotation's GPU span, which covers idle time)."""
    return (getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA
            and not getattr(evt, "is_user_annotation", False))


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (µs in, ms out)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e3


def summarize(prof, wall_ms: float, steps: int, top: int = 20) -> dict:
    events = prof.events()
    gpu = [e for e in events if _is_gpu(e)]
    gpu_ms = busy_ms([(e.time_range.start, e.time_range.end) for e in gpu]) if gpu else None
    kernels: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in gpu:
        kernels[e.name][0] += e.time_range.elapsed_us()
        kernels[e.name][1] += 1
    # The trainer's own phases (record_function names "megasparse.*"): GPU time of every kernel
    # launched inside, and host time.
    phases: dict[str, list] = defaultdict(lambda: [0.0, 0.0])
    for e in events:
        if e.name.startswith(PHASE_PREFIX) and getattr(e, "device_type", None) == torch.autograd.DeviceType.CPU:
            phases[e.name][0] += e.device_time_total
            phases[e.name][1] += e.cpu_time_total
    averages = prof.key_averages()
    syncs = {a.key: a.count / steps for a in averages if a.key in SYNC_OPS}
    cpu_rows = sorted(averages, key=lambda a: -a.self_cpu_time_total)
    return {
        "steps": steps, "wall_ms_per_step": wall_ms / steps,
        "gpu_busy_ms_per_step": gpu_ms / steps if gpu_ms is not None else None,
        "gpu_busy_fraction": gpu_ms / wall_ms if gpu_ms is not None else None,
        "host_syncs_per_step": sum(v for k, v in syncs.items() if k != "aten::_local_scalar_dense"),
        "syncs_per_step": syncs,
        "phases": {k: {"gpu_ms_per_step": v[0] / 1e3 / steps, "host_ms_per_step": v[1] / 1e3 / steps}
                   for k, v in phases.items()},
        # Kernels launched outside the phases' host-side tree: the backward's, which autograd
        # launches from its own thread, and anything between phases.
        "unattributed_gpu_ms_per_step": (sum(v[0] for v in kernels.values()) - sum(v[0] for v in phases.values()))
        / 1e3 / steps,
        "top_gpu_kernels": [{"name": k[:120], "ms_per_step": v[0] / 1e3 / steps, "calls_per_step": v[1] / steps}
                            for k, v in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]],
        "top_host_ops": [{"name": a.key[:120], "self_ms_per_step": a.self_cpu_time_total / 1e3 / steps,
                          "calls_per_step": a.count / steps} for a in cpu_rows[:top]],
    }


def _pct(x) -> str:
    return "n/a (no GPU)" if x is None else f"{x:.1%}"


def markdown(s: dict) -> str:
    busy = s["gpu_busy_ms_per_step"]
    lines = [f"# Profile of {s['steps']} training step(s)", "",
             f"- wall: {s['wall_ms_per_step']:.2f} ms per step",
             "- GPU busy: " + ("n/a (no GPU)" if busy is None
                               else f"{busy:.2f} ms per step ({_pct(s['gpu_busy_fraction'])} of the wall time)"),
             "- host syncs per step: " + (", ".join(f"{k} {v:g}" for k, v in s["syncs_per_step"].items()) or "none"),
             "", "| phase of the step | GPU ms/step (kernels launched inside) | host ms/step |", "|---|---|---|"]
    lines += [f"| {k} | {v['gpu_ms_per_step']:.2f} | {v['host_ms_per_step']:.2f} |" for k, v in s["phases"].items()]
    lines.append(f"| other (the backward's kernels: autograd launches them from its own thread) | "
                 f"{s['unattributed_gpu_ms_per_step']:.2f} | |")
    lines += ["", "| GPU kernel | ms/step | calls/step |", "|---|---|---|"]
    lines += [f"| `{r['name']}` | {r['ms_per_step']:.3f} | {r['calls_per_step']:g} |" for r in s["top_gpu_kernels"]]
    lines += ["", "| host op (self time) | ms/step | calls/step |", "|---|---|---|"]
    lines += [f"| `{r['name']}` | {r['self_ms_per_step']:.3f} | {r['calls_per_step']:g} |" for r in s["top_host_ops"]]
    return "\n".join(lines)
