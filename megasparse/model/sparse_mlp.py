"""The ReLU-gated MLP with its L1 activation term, the dense SwiGLU baseline, and the single
dispatch point that picks a compute backend.

Math (DESIGN.md): g = x W_g^T, u = x W_u^T, h = relu(g) * u, y = h W_d^T, and per layer
l1 = mean over tokens of sum_j |h_j|. Under tensor parallelism the weights here are this rank's
shard (H/tp neurons): every backend works on the local shard and never communicates; the
caller's row-parallel down projection all-reduces y.

Backends (``model.mlp_backend``):
- ``torch``: plain torch ops; the reference, and the path on CPU.
- ``twell``: ``kernels.twell`` inference kernels (no autograd): eval and generation on CUDA. The
  layer's layout counts fires over its first 8192 tokens on the dense path, then moves its
  popular neurons to dense GEMMs (twell_layout.py).
- ``hybrid``: ``kernels.hybrid`` sparse training kernels (autograd) on CUDA.
- ``auto``: CUDA + grad enabled + this layer's measured nnz/H under
  ``model.sparse_nnz_threshold`` -> hybrid, if it measured faster than torch for this layer
  (``model.sparse_calibration``, backend_calibration.py); CUDA + no grad -> twell, whose layout
  may then keep the dense path where it measured faster (an eval before the layer is sparse, a
  narrow tensor-parallel shard); otherwise torch. Activations are dense early in training, where
  the dense path is faster.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megasparse.errors import ConfigError
from megasparse.model.backend_calibration import BackendCalibration, time_forward_backward_ms
from megasparse.model.twell_layout import TwellLayout, dense_ffn


@dataclass
class MLPResult:
    y: torch.Tensor                      # [M, D] (a partial sum under tensor parallelism)
    l1: torch.Tensor                     # 0-dim, >= fp32, mean over tokens of sum_j |h_j| (local shard)
    fire_counts: torch.Tensor | None     # [H_local] int32: tokens with g_j > 0; None if unknown
    token_nnz: torch.Tensor | None = None  # [M] int32: active local neurons per token (for nnz max)


def torch_gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                    w_down: torch.Tensor) -> MLPResult:
    g = x @ w_gate.t()
    h = F.relu(g) * (x @ w_up.t())
    y = h @ w_down.t()
    # Accumulate in at least fp32 (bf16 sums over H lose precision); fp64 stays fp64 for gradcheck.
    acc = torch.promote_types(h.dtype, torch.float32)
    l1 = h.abs().sum(-1, dtype=acc).mean() if h.shape[0] else h.new_zeros((), dtype=acc)
    active = g > 0
    return MLPResult(y, l1, active.sum(0, dtype=torch.int32), active.sum(1, dtype=torch.int32))


def torch_gated_mlp_output(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                           w_down: torch.Tensor) -> MLPResult:
    """y alone, as a dense inference would compute it: no L1 term, no fire counts. Their
    reductions over [M, H] are not free (the whole-model benchmark's dense prefill baseline
    uses this; bench/results/model_h100.md)."""
    y = dense_ffn(x, w_gate, w_up, w_down)
    return MLPResult(y, x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32)), None)


def _twell_forward(x, w_gate, w_up, w_down, layout: TwellLayout) -> MLPResult:
    # the layout is re-derived only when a weight changed, and calibrated on its first tokens
    return MLPResult(layout(x, w_gate, w_up, w_down), x.new_zeros((), dtype=torch.float32), None)


def _hybrid_forward(x, w_gate, w_up, w_down, **options) -> MLPResult:
    """options: kernels.hybrid.sparse_gated_mlp's speed-only keywords (ell_width, hot_frac)."""
    import kernels.hybrid as hybrid

    y, l1, fire_counts = hybrid.sparse_gated_mlp(x, w_gate, w_up, w_down, **options)
    return MLPResult(y, l1, fire_counts)


def choose_backend(requested: str, x: torch.Tensor, nnz_fraction: float, threshold: float) -> str:
    """The one dispatch rule; see the module docstring."""
    if requested != "auto":
        if requested in ("twell", "hybrid") and not x.is_cuda:
            raise ConfigError(f"model.mlp_backend={requested} needs a CUDA device; use 'auto' or 'torch' on CPU")
        if requested == "twell" and torch.is_grad_enabled():
            raise ConfigError("model.mlp_backend=twell is inference-only (no autograd); use 'auto' for training")
        return requested
    if not x.is_cuda:
        return "torch"
    if not torch.is_grad_enabled():
        return "twell"
    return "hybrid" if nnz_fraction < threshold else "torch"


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _gathered(params):
    """DeepSpeed ZeRO-3 gathers partitioned parameters only inside a module's forward."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class ReluGatedMLP(nn.Module):
    """The sparse MLP. It owns its three weights directly (nn.Linear layouts: gate/up [H, D],
    down [D, H], H being this rank's shard) because the backends consume the weights as one
    fused op; owning them here also lets ZeRO-3 gather them when this module runs.

    ``enter_region`` and ``leave_region`` are the tensor-parallel mappings around the local
    computation (copy-to-region on x, all-reduce on y); identity without tensor parallelism.
    """

    def __init__(self, d_model: int, hidden: int, backend: str = "auto", sparse_nnz_threshold: float = 0.05,
                 enter_region=_identity, leave_region=_identity, calibrate: bool = True,
                 recalibrate_steps: int = 0):
        super().__init__()
        self.gate_weight = nn.Parameter(torch.empty(hidden, d_model))
        self.up_weight = nn.Parameter(torch.empty(hidden, d_model))
        self.down_weight = nn.Parameter(torch.empty(d_model, hidden))
        self.backend = backend
        self.sparse_nnz_threshold = sparse_nnz_threshold
        self.enter_region, self.leave_region = enter_region, leave_region
        # False: the torch path computes y only (no L1 term, fire counts or nnz per token), as a
        # dense inference would; the other backends are unchanged. For serving, not training.
        self.track_stats = True
        # Set by the trainer from measured statistics at log intervals, so the choice never syncs.
        self.measured_nnz_fraction = 1.0
        self.last_backend = "torch"
        self._twell_layout = TwellLayout()
        self.calibration = BackendCalibration(enabled=calibrate, recheck_steps=recalibrate_steps)

    def local_forward(self, x2d: torch.Tensor) -> MLPResult:
        """The MLP on this rank's shard, before any tensor-parallel reduction of y."""
        wg, wu, wd = self.gate_weight, self.up_weight, self.down_weight
        backend = choose_backend(self.backend, x2d, self.measured_nnz_fraction, self.sparse_nnz_threshold)
        if backend == "hybrid" and self.backend == "auto":
            backend = self.calibration.backend(self.measured_nnz_fraction)
            if self.calibration.wants_sample():
                self.calibration.sample = x2d.detach()   # measured at the next log interval
        self.last_backend = backend
        if backend == "torch":
            return torch_gated_mlp(x2d, wg, wu, wd) if self.track_stats else torch_gated_mlp_output(x2d, wg, wu, wd)
        if backend == "twell":
            layout = self._twell_layout
            layout.allow_dense = self.backend == "auto"   # auto may keep dense where it measures faster
            result = _twell_forward(x2d, wg, wu, wd, layout)
            if layout.last_call_dense:
                self.last_backend = "torch"
            return result
        return _hybrid_forward(x2d, wg, wu, wd)

    def weights_updated(self) -> None:
        """Call after writing the weights in a way their version counters do not record
        (DeepSpeed's optimizer step, `p.data.copy_`): the twell layout's copies are rebuilt."""
        self._twell_layout.invalidate()

    def calibrate_pending(self) -> str | None:
        """Time dense vs hybrid on the kept input (outside autograd: the trainer calls this at log
        intervals through SparseLlama.set_measured_nnz); returns the choice, or None if nothing
        was pending. Every rank must call it at the same point (it all-reduces the timings)."""
        cal = self.calibration
        if cal.sample is None:     # kept only while a measurement is pending; decide() clears it
            return None
        x = cal.sample
        weights = [self.gate_weight, self.up_weight, self.down_weight]
        fns = {"torch": torch_gated_mlp, "hybrid": _hybrid_forward}
        with _gathered(weights):   # ZeRO-3 keeps only partitions outside forward
            measure = lambda b: time_forward_backward_ms(fns[b], x, weights, cal.warmup, cal.iters)  # noqa: E731
            return cal.decide(self.measured_nnz_fraction, measure)

    def forward(self, x: torch.Tensor):
        """(y, l1, fire_counts, token_nnz); the last two are None where a backend cannot tell."""
        shape = x.shape
        result = self.local_forward(self.enter_region(x.reshape(-1, shape[-1])))
        return self.leave_region(result.y).view(shape), result.l1, result.fire_counts, result.token_nnz


class SwiGLUMLP(nn.Module):
    """The dense baseline: silu(x W_g^T) * x W_u^T, no L1 term. ``linear_factory(in, out, kind)``
    builds the projections ("column" for gate/up, "row" for down). Under tensor parallelism x
    enters the region once (``enter_region``), so gate and up share one all-reduce of dx."""

    def __init__(self, d_model: int, hidden: int, linear_factory, enter_region=_identity):
        super().__init__()
        self.enter_region = enter_region
        self.gate_proj = linear_factory(d_model, hidden, "column", input_in_region=True)
        self.up_proj = linear_factory(d_model, hidden, "column", input_in_region=True)
        self.down_proj = linear_factory(hidden, d_model, "row")

    def forward(self, x: torch.Tensor):
        x = self.enter_region(x)
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return y, x.new_zeros((), dtype=torch.float32), None, None
