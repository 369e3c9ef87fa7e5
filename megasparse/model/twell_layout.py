"""The twell backend's weight layout for one layer: rebuilt when a weight changes, then
calibrated on the tokens it first serves.

kernels.twell is fastest when the layer's most popular neurons go through dense tensor-core GEMMs
and the rest through TwELL gathers (kernels.twell.calibrate: 1.27x against dense with every
neuron sparse, 1.68x with the 1536 most popular dense, at the benchmark layer on an H100;
kernels/twell/NOTES.md). Which neurons are popular depends on the trained weights and the data,
so a fresh layout counts each neuron's fires over its first `calibration_tokens` tokens (the
kernels count them as they go) and then reorders itself once. Every layout computes the same
function, so nothing served while calibrating is approximated; only the speed changes.
"""
from __future__ import annotations

import torch

CALIBRATION_TOKENS = 8192


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
    return tuple((w.data_ptr(), w._version) for w in weights)


class TwellLayout:
    """Callable as layout(x, w_gate, w_up, w_down) -> y, for one layer's weights (nn.Linear
    layouts). A layout that cannot be cached (weight_layout_key is None: ZeRO-3) is rebuilt on
    every call and stays uncalibrated."""

    def __init__(self, calibration_tokens: int = CALIBRATION_TOKENS):
        if calibration_tokens < 0:
            raise ValueError(f"calibration_tokens={calibration_tokens} must be >= 0 (0: never calibrate)")
        self.calibration_tokens = calibration_tokens
        self.key = None
        self.weights = None       # kernels.twell.TwellWeights
        self.fire_counts = None   # int32 [H] summed over the tokens seen while calibrating
        self.tokens_seen = 0

    @property
    def calibrated(self) -> bool:
        return self.weights is not None and self.weights.n_hot > 0

    def __call__(self, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor) -> torch.Tensor:
        import kernels.twell as twell  # lazily: CPU runs never need Triton

        key = weight_layout_key(w_gate, w_up, w_down)
        if key is None or key != self.key:
            self.key, self.weights = key, twell.prepare_weights(w_gate, w_up, w_down)
            self.fire_counts, self.tokens_seen = None, 0
        if key is None or self.tokens_seen >= self.calibration_tokens or self.calibration_tokens == 0:
            return twell.twell_ffn(x, self.weights)
        y, fires = twell.twell_ffn(x, self.weights, return_fire_counts=True)
        self.fire_counts = fires if self.fire_counts is None else self.fire_counts + fires
        self.tokens_seen += x.shape[0]
        if self.tokens_seen >= self.calibration_tokens:
            self.weights = twell.calibrate(self.weights, self.fire_counts, self.tokens_seen)
        return y
