"""The twell backend's weight layout for one layer: rebuilt when a weight changes, then
calibrated on the tokens it first serves.

kernels.twell is fastest when the layer's most popular neurons go through dense tensor-core GEMMs
and the rest through TwELL gathers (kernels.twell.calibrate: 1.27x against dense with every
neuron sparse, 1.68x with the 1536 most popular dense, at the benchmark layer on an H100;
kernels/twell/NOTES.md). Which neurons are popular depends on the trained weights and the data,
so a fresh layout counts each neuron's fires over its first `calibration_tokens` tokens (the
kernels count them as they go) and then reorders itself once. At narrow tensor-parallel widths
the dense columns buy no GPU time and cost two more launches, which an eager call pays on the
host (NOTES.md run 12), so on CUDA both layouts are timed once on the last calibration batch and
the faster one is kept. Every layout computes the same function, so nothing served while
calibrating is approximated; only the speed changes.

A layout can also be preset (`preset_hot(n_hot)`, what `megasparse.inference.load_pretrained`
does for an export calibrated at export time, docs/export.md): the weights' neurons are then
already in popularity order, so the first n_hot are made dense as they stand (no permutation),
nothing is counted or timed at run time, and the layout is final as soon as it is built.

CUDA graphs: a captured call keeps using the layout it captured (its weight copies stay alive
here, so a replay never reads freed memory). Capture after calibration, and capture again after
a weight update. Nothing is counted, calibrated or timed during a capture.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from megasparse.model.backend_calibration import median_call_ms

CALIBRATION_TOKENS = 8192
TIMING_CALLS = 3   # per layout, after one warm-up call (which also runs the kernels' autotuners)


def weight_layout_key(*weights: torch.Tensor) -> tuple | None:
    """When the kernel's weight layout may be reused: the key changes whenever a weight does, or
    None when that cannot be told cheaply and the layout must be rebuilt on every call.

    A plain parameter's version counter moves on every in-place optimizer update, and a new
    tensor has a new address. A ZeRO-3 parameter is gathered into a fresh buffer per forward: the
    caching allocator can hand back the same address, and the parameter keeps its own version
    counter while DeepSpeed updates only the partitions, so (address, version) could repeat after
    an optimizer step and serve a stale layout. Those are never cached (eval forwards only)."""
    if any(hasattr(w, "ds_id") for w in weights):
        return None
    return tuple((w.data_ptr(), w._version, w.dtype, tuple(w.shape), w.device) for w in weights)


class TwellLayout:
    """Callable as layout(x, w_gate, w_up, w_down) -> y, for one layer's weights (nn.Linear
    layouts). A layout that cannot be cached (weight_layout_key is None: ZeRO-3) is rebuilt on
    every call and stays uncalibrated."""

    def __init__(self, calibration_tokens: int = CALIBRATION_TOKENS, preset_n_hot: int | None = None):
        if calibration_tokens < 0:
            raise ValueError(f"calibration_tokens={calibration_tokens} must be >= 0 (0: never calibrate)")
        self.calibration_tokens = calibration_tokens
        self.preset_n_hot: int | None = None
        if preset_n_hot is not None:
            self.preset_hot(preset_n_hot)
        self.key = None
        self.weights = None       # kernels.twell.TwellWeights
        self.fire_counts = None   # int32 [H] summed over the tokens seen while calibrating
        self.tokens_seen = 0
        self.final = False        # calibration is over (or never happens): the layout stays
        self.timings_ms: dict[str, float] = {}   # the two layouts, timed once on CUDA
        self._in_graphs: list = []   # layouts a captured CUDA graph computes with

    def preset_hot(self, n_hot: int) -> None:
        """Use the first `n_hot` neurons (in the weights' own order) densely from the first call,
        with no run-time calibration: for weights whose neurons were sorted most-popular-first
        beforehand (an export calibrated at export time). n_hot must be a multiple of the
        kernels' tile and at most H (checked when the layout is built); 0 runs every neuron
        sparse. The preset holds for every rebuild after a weight change as well."""
        if isinstance(n_hot, bool) or not isinstance(n_hot, int) or n_hot < 0:
            raise ValueError(f"n_hot={n_hot!r} must be a non-negative int (a multiple of the twell tile)")
        self.preset_n_hot = n_hot
        self.key = None   # rebuild on the next call

    def _build(self, twell, w_gate, w_up, w_down):
        weights = twell.prepare_weights(w_gate, w_up, w_down)
        n_hot = self.preset_n_hot
        if n_hot is not None and (n_hot % weights.tile or n_hot > weights.hidden):
            raise ValueError(f"preset n_hot={n_hot} must be a multiple of the twell tile {weights.tile} and at most "
                             f"this layer's H={weights.hidden}; re-export the model or preset another n_hot")
        return weights if not n_hot else replace(weights, n_hot=n_hot)

    @property
    def calibrated(self) -> bool:
        """Popular neurons run through the dense GEMMs."""
        return self.weights is not None and self.weights.n_hot > 0

    def __call__(self, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor) -> torch.Tensor:
        import kernels.twell as twell  # lazily: CPU runs never need Triton

        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        key = weight_layout_key(w_gate, w_up, w_down)
        if key is None or key != self.key:
            if capturing and key is not None:   # the copies would only exist inside the graph
                raise RuntimeError("the twell layout of this layer was built or changed inside a CUDA graph capture; "
                                   "run an eager forward after the last weight update (and past the layout's "
                                   f"{self.calibration_tokens} calibration tokens) before capturing")
            self.key, self.weights = key, self._build(twell, w_gate, w_up, w_down)
            self.fire_counts, self.tokens_seen = None, 0
            self.final = key is None or self.calibration_tokens == 0 or self.preset_n_hot is not None
            self.timings_ms = {}
        if capturing:
            if key is not None and not any(w is self.weights for w in self._in_graphs):
                self._in_graphs.append(self.weights)
            return twell.twell_ffn(x, self.weights)
        if self.final:
            return twell.twell_ffn(x, self.weights)
        y, fires = twell.twell_ffn(x, self.weights, return_fire_counts=True)
        self.fire_counts = fires if self.fire_counts is None else self.fire_counts + fires
        self.tokens_seen += x.shape[0]
        if self.tokens_seen >= self.calibration_tokens:
            self._choose(twell.calibrate(self.weights, self.fire_counts, self.tokens_seen), x)
        return y

    def _choose(self, hot, x: torch.Tensor) -> None:
        """Keep `hot` (popular neurons dense) unless, timed on CUDA, every-neuron-sparse is faster."""
        import kernels.twell as twell

        self.final = True
        if hot.n_hot == 0:
            return
        if x.is_cuda:
            self.timings_ms = {name: median_call_ms(lambda: twell.twell_ffn(x, w), True, 1, TIMING_CALLS)
                               for name, w in (("all sparse", self.weights), (f"hot{hot.n_hot}", hot))}
            if self.timings_ms["all sparse"] <= self.timings_ms[f"hot{hot.n_hot}"]:
                return
        self.weights = hot
