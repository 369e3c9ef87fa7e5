"""Does the sparse training kernel beat dense for THIS layer? Measure it before switching.

Whether the hybrid kernels win depends on D, the local H, the tokens per micro-batch and the
layer's sparsity (bench/results/ffn_train_h100.md: 1.38x at D=2048/H=5632, 0.76x at H=1408; a
125M model at D=768 ran 27% slower after switching). So the `auto` backend does not switch on
the nnz threshold alone: once a layer is under it, its next training forward stays dense and
keeps its input; at the following log interval (outside any autograd graph) both paths run
forward+backward on that input with the layer's weights, and the faster one is kept. A layer
that stayed dense is measured again once its nnz/H has halved (sparse gets faster as
activations thin out). Any choice is also measured again `recheck_steps` training steps after it
was made: the sparse kernels' speed depends on more than the mean nnz (the largest rows, the
popular neurons), which keep moving while the model trains. A 0.5B model switched 7 layers to
hybrid at step ~110 and, with that choice kept, ran at 0.91x of its dense step by step 600;
re-measured every 200 steps, two layers went back to dense and the step kept 1.13x
(bench/results/model_h100.md).

Every rank sums the timings over the default process group before choosing, so all ranks pick
the same path (the TP statistics collectives depend on it) and no rank waits on another's
decision later.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

BACKENDS = ("torch", "hybrid")


class BackendCalibration:
    def __init__(self, enabled: bool = True, warmup: int = 2, iters: int = 5, recheck_steps: int = 0):
        if recheck_steps < 0:
            raise ValueError(f"recheck_steps={recheck_steps} must be >= 0 (0: never measure a choice again)")
        self.enabled, self.warmup, self.iters = enabled, warmup, iters
        self.recheck_steps = recheck_steps
        self.choice: str | None = None          # None: not measured yet (or due again)
        self.nnz_at_choice = 1.0
        self.step = 0                            # the trainer's step, as last told (note_step)
        self.step_at_choice = 0
        self.timings_ms: dict[str, float] = {}
        self.sample: torch.Tensor | None = None  # the input kept for the pending measurement

    def state_dict(self) -> dict:
        """The choice and its schedule (identical on every rank: decide() agrees across ranks)."""
        return {"choice": self.choice, "nnz_at_choice": self.nnz_at_choice, "step": self.step,
                "step_at_choice": self.step_at_choice}

    def load_state_dict(self, state: dict) -> None:
        self.choice, self.nnz_at_choice = state["choice"], state["nnz_at_choice"]
        self.step, self.step_at_choice = state["step"], state["step_at_choice"]

    def backend(self, nnz_fraction: float) -> str:
        """What an eligible (under-threshold) training forward runs now."""
        if not self.enabled or self.choice == "hybrid":
            return "hybrid"
        if self.choice == "torch" and nnz_fraction <= 0.5 * self.nnz_at_choice:
            self.choice = None                   # activations have thinned out: measure again
        return "torch"

    def note_step(self, step: int) -> None:
        """The trainer's step (at each log interval): a choice older than recheck_steps is due."""
        self.step = int(step)
        if self.choice is not None and self.recheck_steps and self.step - self.step_at_choice >= self.recheck_steps:
            self.choice = None   # the next eligible forward runs dense and keeps its input

    def wants_sample(self) -> bool:
        return self.enabled and self.choice is None

    def decide(self, nnz_fraction: float, measure_ms: Callable[[str], float]) -> str:
        """Time both paths (measure_ms(backend) -> ms), agree across ranks, keep the faster."""
        local = [measure_ms(b) for b in BACKENDS]
        times = torch.tensor(local, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            device = self.sample.device if self.sample is not None else torch.device("cpu")
            times = times.to(device)
            dist.all_reduce(times)                # the same sums, so the same choice everywhere
            times = times.cpu()
        self.timings_ms = dict(zip(BACKENDS, local))
        self.choice = BACKENDS[int(torch.argmin(times))]
        self.nnz_at_choice = nnz_fraction
        self.step_at_choice = self.step
        self.sample = None
        return self.choice


def call_times_ms(call: Callable[[], object], cuda: bool, warmup: int, iters: int) -> list[float]:
    """ms of each of `iters` runs of call() after `warmup` ones. On CUDA each run is timed by
    events and waited for, so it is what an eager caller waits for; else by the host clock."""
    times = []
    for i in range(warmup + iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        call()
        if cuda:
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return times


def median_call_ms(call: Callable[[], object], cuda: bool, warmup: int, iters: int) -> float:
    """Median of call_times_ms."""
    times = sorted(call_times_ms(call, cuda, warmup, iters))
    return times[len(times) // 2]


def back_to_back_ms(call: Callable[[], object], warmup: int, rounds: int, calls: int) -> float:
    """CUDA ms per call() when `calls` of them are issued back to back, as a model's layers are:
    the host may run ahead, so this is the GPU time, or the host's issue time where that is
    longer. The median over `rounds` rounds, after `warmup` calls."""
    for _ in range(warmup):
        call()
    per_call = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / calls)
    return sorted(per_call)[len(per_call) // 2]


def time_forward_backward_ms(fn, x: torch.Tensor, weights: list[torch.Tensor], warmup: int, iters: int) -> float:
    """Median ms of fn(x, *weights) forward + backward of sum(y * x) + l1, on detached copies
    (no gradient reaches the real parameters). Uses x itself as the output gradient, so no
    random numbers are drawn (the trainer's RNG streams stay exact for resume)."""
    xs = x.detach().requires_grad_(True)
    ws = [w.detach().requires_grad_(True) for w in weights]

    def step():
        xs.grad = None
        for w in ws:
            w.grad = None
        out = fn(xs, *ws)
        ((out.y.float() * xs.detach().float()).sum() + out.l1).backward()

    with torch.enable_grad():
        return median_call_ms(step, x.is_cuda, warmup, iters)
