"""The twell backend's weight layout for one layer: rebuilt when a weight changes, then
calibrated on the tokens it first serves.

kernels.twell is fastest when the layer's most popular neurons go through dense tensor-core GEMMs
and the rest through TwELL gathers (kernels.twell.calibrate: 1.27x against dense with every
neuron sparse, 1.68x with the 1536 most popular dense, at the benchmark layer on an H100;
kernels/twell/NOTES.md). Which neurons are popular depends on the trained weights and the data,
so a fresh layout counts each neuron's fires over its first `calibration_tokens` tokens and then
picks its layout once:
- `all sparse` (every neuron through the gathers) is a candidate only while the layer fires at
  most SPARSE_NNZ_FRACTION of its neurons per token. Its gathers grow with nnz, and on dense
  activations its TwELL tiles overflow into a row-by-row walk. At the benchmark layer on an H100
  it ran at 1.28x of dense at 0.5% nnz/H, 0.58x at 2%, 0.30x at 5%, and 0.015x at 25%: 121 ms
  against 1.9 (bench/results/probe_dense_activations_h100.md, kernels/twell/NOTES.md run 17);
- `hot<n>` (kernels.twell.calibrate) makes every neuron firing on more than 0.6% of tokens
  dense, so its gathered tail is sparse by construction (1.28-1.64x of dense at the benchmark
  layer from 0.5% to 50% nnz/H, since never-firing neurons skip the up and down GEMMs). One
  exception: n_hot is whole tiles of 128, so where H is not a multiple of 128 up to 127 popular
  neurons stay in the tail, and on dense activations its last tile overflows into the slower
  (still exact) walk; timing then weighs it against dense;
- `dense` (the torch GEMMs) is a candidate when `allow_dense` is set, which the MLP does for
  `model.mlp_backend=auto`. Evaluation early in training (before the L1 term has made the layer
  sparse) and narrow tensor-parallel shards, where an eager twell call is host-bound (NOTES.md
  run 12), then never run slower than dense.
On CUDA the candidates are each timed once and the fastest is kept. Each is timed over calls
issued back to back, as a model's layers are: the GPU time, or the host's issue time where that
is longer. An eager twell call issues about ten launches, and at the tensor-parallel widths a
call of 16k tokens or fewer is host-bound (NOTES.md run 12). A call timed alone and waited for
would also count the GPU's waits on the host inside the call: up to +0.5 ms (over do_bench) for
the hot layout at the benchmark layer, where back to back it is GPU-bound (run 17). The timing uses the last
calibration batch, so the choice fits calls of that size. A layout rebuilt after a weight update
(each eval during training) counts afresh but keeps the kind (dense, all sparse or hot) timed
last while its nnz/H stays within 2x of the timed one, and times again after 8 untimed
rebuilds: timing three candidates costs ~40 calls. On CPU (tests under the interpreter) the choice is
untimed: dense if allowed and the layer is too dense for `all sparse`, else the hot layout. The
counting calls themselves run the dense path, which is safe on activations of any density.
Every layout computes the same function, so nothing is approximated while calibrating; only the
speed changes.

A layout can also be preset (`preset_hot(n_hot)`, what `megasparse.inference.load_pretrained`
does for an export calibrated at export time, docs/export.md): the weights' neurons are then
already in popularity order, so the first n_hot are made dense as they stand (no permutation),
nothing is counted or timed at run time, and the layout is final as soon as it is built. A
preset, like `calibration_tokens=0` (every neuron sparse, never counted), is kept as given even
with `allow_dense`: the export's counts chose n_hot.

Weights that cannot be cached (ZeRO-3 gathers them per forward: weight_layout_key is None) are
never counted. With `allow_dense` they are served dense, since an untried twell layout may be the
slow one; without it, every neuron sparse, rebuilt on every call.

Weights updated without moving their version counter are not seen by the key. DeepSpeed's
optimizers write the new values through `.data` (ZeRO 1 and 2, and bf16 at stage 0: checked on
CPU, NOTES.md run 17), as does any `p.data.copy_`. Whoever updates weights that way must call
`invalidate()` (`SparseLlama.weights_updated()` for a whole model) before the next forward, or
the layout serves its copies of the old weights. The trainer does it at the start of every eval.

CUDA graphs: a captured call keeps using the layout it captured (its weight copies stay alive
here, so a replay never reads freed memory). Capture after calibration, and capture again after
a weight update. Nothing is counted, calibrated or timed during a capture; a capture before the
layout is final records the dense path.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from megasparse.model.backend_calibration import back_to_back_ms

CALIBRATION_TOKENS = 8192
# Per candidate: warm-up calls (the first also runs the kernels' autotuners; the first call after
# it still ran up to 2x slow on an H100), then rounds of back-to-back calls; the median round counts.
TIMING_WARMUP, TIMING_ROUNDS, TIMING_CALLS = 2, 3, 4
# Most nnz/H per token at which every-neuron-sparse is tried at all: past it, it only loses (see
# above), and timing it on a half-dense layer would cost seconds.
SPARSE_NNZ_FRACTION = 0.05
# A rebuilt layout (after a weight update: every eval during training) keeps the kind of layout
# timed last without timing again while its nnz/H is within this ratio of the timed one, on calls
# of the same size, for at most this many rebuilds in a row.
RETIME_NNZ_RATIO, RETIME_AFTER_REBUILDS = 2.0, 8
DENSE = "dense"
ALL_SPARSE = "all sparse"


def weight_layout_key(*weights: torch.Tensor) -> tuple | None:
    """When the kernel's weight layout may be reused: the key changes whenever a weight is
    replaced or updated in place through autograd-visible ops, or None when that cannot be told
    cheaply and the layout must be rebuilt on every call. Writes through `.data` (DeepSpeed's
    ZeRO 1/2 steps) are invisible to it: see TwellLayout.invalidate.

    A plain parameter's version counter moves on every in-place torch optimizer update, and a new
    tensor has a new address. A ZeRO-3 parameter is gathered into a fresh buffer per forward: the
    caching allocator can hand back the same address, and the parameter keeps its own version
    counter while DeepSpeed updates only the partitions, so (address, version) could repeat after
    an optimizer step and serve a stale layout. Those are never cached (eval forwards only)."""
    if any(hasattr(w, "ds_id") for w in weights):
        return None
    return tuple((w.data_ptr(), w._version, w.dtype, tuple(w.shape), w.device) for w in weights)


def dense_ffn(x, w_gate, w_up, w_down, fire_counts: bool = False):
    """y = (relu(x W_g^T) * x W_u^T) W_d^T with torch GEMMs; with fire_counts also the int32 [H]
    count of tokens with g_j > 0 (what the twell kernels would count)."""
    g = x @ w_gate.t()
    y = (F.relu(g) * (x @ w_up.t())) @ w_down.t()
    return (y, (g > 0).sum(0, dtype=torch.int32)) if fire_counts else y


class TwellLayout:
    """Callable as layout(x, w_gate, w_up, w_down) -> y, for one layer's weights (nn.Linear
    layouts). `choice` names the layout in use once final: DENSE, ALL_SPARSE or hot<n_hot>."""

    def __init__(self, calibration_tokens: int = CALIBRATION_TOKENS, preset_n_hot: int | None = None,
                 allow_dense: bool = False):
        if calibration_tokens < 0:
            raise ValueError(f"calibration_tokens={calibration_tokens} must be >= 0 (0: never calibrate)")
        self.calibration_tokens = calibration_tokens
        self._allow_dense = allow_dense
        self.preset_n_hot: int | None = None
        if preset_n_hot is not None:
            self.preset_hot(preset_n_hot)
        self.key = None
        self.weights = None       # kernels.twell.TwellWeights of the twell layout in use, else None
        self.choice: str | None = None
        self.fire_counts = None   # int32 [H] summed over the tokens seen while calibrating
        self.tokens_seen = 0
        self.nnz_fraction: float | None = None   # mean fires per token / H over those tokens
        self.final = False        # calibration is over (or never happens): the layout stays
        self.timings_ms: dict[str, float] = {}   # the candidates, timed once on CUDA
        self.last_call_dense = False   # the last call ran the torch GEMMs, not the twell kernels
        self._last_timed: dict | None = None   # the last timed choice's kind, nnz/H, tokens, reuses
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

    def invalidate(self) -> None:
        """The weights may have changed where the key cannot see it (see the module docstring):
        rebuild, and count afresh, on the next call. The last timed kind stays reusable."""
        self.key = None

    @property
    def allow_dense(self) -> bool:
        return self._allow_dense

    @allow_dense.setter
    def allow_dense(self, value: bool) -> None:
        """The MLP sets it before each call (model.mlp_backend=auto); a change starts a new layout."""
        if bool(value) != self._allow_dense:
            self._allow_dense, self.key, self._last_timed = bool(value), None, None

    @property
    def calibrated(self) -> bool:
        """Popular neurons run through the dense GEMMs of the twell kernels."""
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
            self._reset(twell, key, w_gate, w_up, w_down)
        self.last_call_dense = self.choice == DENSE or not self.final   # chosen, or still counting
        if self.choice == DENSE or (not self.final and capturing):
            return dense_ffn(x, w_gate, w_up, w_down)
        if self.final:
            if capturing and key is not None and not any(w is self.weights for w in self._in_graphs):
                self._in_graphs.append(self.weights)
            return twell.twell_ffn(x, self.weights)
        y, fires = dense_ffn(x, w_gate, w_up, w_down, fire_counts=True)
        self.fire_counts = fires if self.fire_counts is None else self.fire_counts + fires
        self.tokens_seen += x.shape[0]
        if self.tokens_seen >= self.calibration_tokens:
            try:
                self._choose(twell, x, w_gate, w_up, w_down)
            except BaseException:
                self.key = None   # never left half-chosen: the next call starts over
                raise
        return y

    def _reset(self, twell, key, w_gate, w_up, w_down) -> None:
        """A new layout for new weights: counting from zero, or final at once when it cannot or
        need not be calibrated (built now: a preset, calibration_tokens=0, uncached weights)."""
        self.key, self.weights, self.choice = None, None, None   # the key last: a failed build retries
        self.fire_counts, self.tokens_seen, self.nnz_fraction = None, 0, None
        self.timings_ms = {}
        self.final = key is None or self.calibration_tokens == 0 or self.preset_n_hot is not None
        if key is None and self.allow_dense and self.preset_n_hot is None:
            self.choice = DENSE
        elif self.final:
            self.weights = self._build(twell, w_gate, w_up, w_down)
            self.choice = f"hot{self.weights.n_hot}" if self.weights.n_hot else ALL_SPARSE
        self.key = key

    def _choose(self, twell, x, w_gate, w_up, w_down) -> None:
        """Pick the layout from the counted fires (see the module docstring), once."""
        self.final = True
        self.nnz_fraction = float(self.fire_counts.sum()) / (self.tokens_seen * w_gate.shape[0])
        base = self._build(twell, w_gate, w_up, w_down)
        hot = twell.calibrate(base, self.fire_counts, self.tokens_seen)
        sparse_enough = self.nnz_fraction <= SPARSE_NNZ_FRACTION
        layouts = {}
        if sparse_enough or not (hot.n_hot or self.allow_dense):   # the last: nothing else can serve it
            layouts[ALL_SPARSE] = base
        if hot.n_hot:
            layouts[f"hot{hot.n_hot}"] = hot
        candidates = {**layouts, DENSE: None} if self.allow_dense else layouts
        if x.is_cuda and len(candidates) > 1:
            self.choice = self._time(twell, candidates, x, w_gate, w_up, w_down)
        elif self.allow_dense and not sparse_enough:
            self.choice = DENSE
        else:
            self.choice = list(layouts)[-1]   # the hot layout when there is one
        self.weights = candidates[self.choice]

    def _time(self, twell, candidates: dict, x, w_gate, w_up, w_down) -> str:
        """The candidate to keep: the kind timed last, if it may be reused (see RETIME_*), else
        the fastest when timed now."""
        kinds = {_kind(name): name for name in candidates}
        last = self._last_timed
        if (last is not None and last["kind"] in kinds and last["tokens"] == x.shape[0]
                and last["reuses"] < RETIME_AFTER_REBUILDS
                and self.nnz_fraction <= RETIME_NNZ_RATIO * last["nnz"] and last["nnz"] <= RETIME_NNZ_RATIO * self.nnz_fraction):
            last["reuses"] += 1
            return kinds[last["kind"]]
        calls = {name: (lambda w=w: dense_ffn(x, w_gate, w_up, w_down) if w is None else twell.twell_ffn(x, w))
                 for name, w in candidates.items()}
        self.timings_ms = {name: back_to_back_ms(call, TIMING_WARMUP, TIMING_ROUNDS, TIMING_CALLS)
                           for name, call in calls.items()}
        choice = min(self.timings_ms, key=self.timings_ms.get)
        self._last_timed = {"kind": _kind(choice), "nnz": self.nnz_fraction, "tokens": x.shape[0], "reuses": 0}
        return choice


def _kind(name: str) -> str:
    return "hot" if name.startswith("hot") else name
