"""The hybrid sparse format used for training: cold ELL + per-neuron CSC + two dense backups.

An activation (token i, neuron j) with g_ij > 0 lands in exactly one of three parts:
  * hot neurons (fire_counts[j] > hot_frac * M, rounded up to a multiple of 64): a dense [M, K] panel over all tokens. A neuron
    that fires for more than ~1% of tokens is cheaper through a tensor-core GEMM than through
    per-activation row gathers (the gather moves 2*D bytes per activation, the GEMM 2*M*D flops
    per neuron). This is the dense backup in the neuron direction, and it bounds the length of
    every cold neuron's CSC segment by hot_frac * M.
  * heavy tokens (more than `ell_width` nonzeros): the gate epilogue could not store them all, so
    they are recomputed densely (over cold neurons) from x in forward and backward: the dense
    backup in the token direction. Never truncated: their true count comes from the epilogue.
  * everything else, the cold tail, as a per-token ELL of width Wc = the largest cold count of a
    light token (exact, so nothing overflows), plus the per-neuron (CSC) view of the same slots
    that the weight-gradient products need: csc_slot lists flat ELL slots (i * Wc + s) sorted by
    neuron, csc_ptr[j]:csc_ptr[j+1] delimits neuron j.

Host synchronisation. With SYNC_FREE off: ONE device-to-host read per layer forward (R heavy
rows, K hot neurons, Wc) right after the gate, so every size is exact. Default capacity path
(SYNC_FREE on): the first call for a layer (key: w_gate's storage, M, H, ell_width,
hot_frac) reads (R, K, Wc) from the device before building, so every size is exact. Later calls
do not wait: they take K and Wc from capacities remembered from the previous call (CAPS), so the
hot GEMMs and cold kernels are enqueued at once. Any capacity miss is still exact: with fewer
hot neurons than the threshold asks for, the rest simply stay cold; a token whose cold count
exceeds Wc is flagged on device by the split kernel and joins the heavy (dense backup) rows.
The only host read left is R (+ the next capacities), copied to pinned memory right after the
split and read by `resolve()` at the END of the forward, when the rest of the forward is
already queued on the GPU, so it costs no GPU idle time. Backward has none. (Still not
CUDA-graph capturable: the heavy backup has a data-dependent shape.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .gate_pack import gate_pack
from .row_pack import cublas_gate_pack
from .split_pack import reference as split_reference
from .split_pack import split_pack


# Capacity path (no mid-forward host sync, see the module docstring). On by default: on H100 the
# main case's step is 4.22 vs 4.68 ms with the host sync (NOTES.md variants 8 and 10). A stale
# capacity costs speed on one call, never correctness. False: the exact path with the host sync.
SYNC_FREE = {"enabled": True}
CAP_HEADROOM = (1.25, 8)       # next Wc = ceil(need * 1.25) + 8, a multiple of 8
_CAPS: dict = {}               # layer key -> [K, Wc]


# How the gate GEMM is done: the fused Triton GEMM+pack epilogue, or cuBLAS then a pack pass
# (faster on H100 today, NOTES.md). Both give the same pattern up to fp32-vs-bf16 rounding of g.
GATE = {"fused_epilogue": False}


@dataclass
class HybridPattern:
    fire: torch.Tensor      # [H] int32: tokens with g_j > 0 (all parts)
    cnt: torch.Tensor       # [M] int32: cold nonzeros of a light token (0 for heavy tokens)
    idx: torch.Tensor       # [M, Wc] int32: neuron of each cold slot (0 in unused slots)
    g: torch.Tensor         # [M, Wc] fp32: g at each cold slot (0 in unused slots, > 0 in used ones)
    csc_ptr: torch.Tensor   # [H + 1] int32
    csc_slot: torch.Tensor  # [M * Wc] int32: flat slots sorted by neuron (tail past csc_ptr[H] unused)
    hot: torch.Tensor       # [K] int64: hot neuron ids
    heavy: torch.Tensor | None  # [R] int64: heavy token ids (None until resolve() on the capacity path)
    cold_mask: torch.Tensor  # [H] bool: neurons outside the hot set (used by the heavy backup)
    _pending: tuple | None = None  # capacity path: (host stats, event, heavy flags [M], cap key)

    def resolve(self) -> "HybridPattern":
        """Fill `heavy` (the one host read of the capacity path) and update the capacities."""
        if self._pending is None:
            return self
        stats, event, flag, key = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        R, K_need, W_need = (int(v) for v in stats.tolist())
        a, b = CAP_HEADROOM
        _CAPS[key] = [K_need, max(8, -(-(int(W_need * a) + b) // 8) * 8)]
        self.heavy = (torch.argsort(flag, descending=True, stable=True)[:R] if R
                      else torch.zeros(0, dtype=torch.int64, device=flag.device))
        return self

    @property
    def width(self) -> int:
        return self.idx.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.fire, self.cnt, self.idx, self.g, self.csc_ptr, self.csc_slot, self.hot,
                    self.heavy, self.cold_mask))


def build_pattern(x: torch.Tensor, w_gate: torch.Tensor, ell_width: int, hot_frac: float | None,
                  _packed=None, _use_reference: bool = False, hot_multiple: int = 64) -> HybridPattern:
    """Run the gate GEMM + epilogue pack, then split into hot / heavy / cold parts.

    `hot_frac=None` disables the hot dense panel (every neuron goes through the CSC path).
    `_packed` lets tests inject gate_pack's output (e.g. from its reference), and
    `_use_reference` then builds the split with the pure-torch reference.
    """
    M = x.shape[0]
    H = w_gate.shape[0]
    if _packed is None:
        _packed = (gate_pack if GATE["fused_epilogue"] else cublas_gate_pack)(x, w_gate, ell_width)
    fire, cnt0, idx0, val0 = _packed
    dev = x.device
    W0 = idx0.shape[1]
    light = cnt0 <= W0
    # Hot set: neurons firing on > hot_frac * M tokens, rounded up to a multiple of
    # `hot_multiple` with the next most popular neurons (cuBLAS falls back to slow sm75 kernels
    # for GEMM sizes like 2K = 490; NOTES.md). Chosen by a sort, so the count stays on device.
    order = torch.argsort(fire, descending=True, stable=True)
    if hot_frac is None:
        n_hot = torch.zeros((), dtype=torch.int64, device=dev)
    else:
        n_hot = (fire > int(hot_frac * M)).sum()
        n_hot = torch.clamp((n_hot + hot_multiple - 1) // hot_multiple * hot_multiple, max=H)
    key = (dev.type, dev.index, w_gate.untyped_storage().data_ptr(), w_gate.storage_offset(), M, H,
           W0, hot_frac, hot_multiple)
    caps = _CAPS.get(key) if SYNC_FREE["enabled"] and not _use_reference else None
    if caps is not None:
        # Capacity path: no host read here (see the module docstring).
        K, Wc = min(caps[0], H), max(caps[1], 1)
        hot_mask = torch.zeros(H, dtype=torch.bool, device=dev)
        hot_mask.index_fill_(0, order[:K], True)   # (x[i] = True would copy the scalar host->device)
        cnt, idx, g, csc_ptr, csc_slot, flag, need = split_pack(cnt0, idx0, val0, hot_mask, Wc, flags=True)
        stats = torch.stack([flag.sum().to(torch.int64), n_hot.to(torch.int64),
                             need.max().to(torch.int64) if M else n_hot.new_zeros(())])
        if dev.type == "cuda":
            host = torch.empty(3, dtype=torch.int64, pin_memory=True)
            host.copy_(stats, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = stats, None
        return HybridPattern(fire, cnt, idx, g, csc_ptr, csc_slot, order[:K], None, ~hot_mask,
                             _pending=(host, event, flag, key))
    hot_mask = torch.zeros(H, dtype=torch.bool, device=dev)
    hot_mask[order] = torch.arange(H, device=dev) < n_hot
    zero = torch.zeros((), dtype=cnt0.dtype, device=dev)
    # Wc = the largest light-token count bounds every light token's cold count.
    stats = torch.stack([(~light).sum().to(cnt0.dtype), hot_mask.sum().to(cnt0.dtype),
                         torch.where(light, cnt0, 0).max() if M else zero])
    R, K, Wc = (int(v) for v in stats.tolist())  # the host sync of the exact (first-call) path
    Wc = max(Wc, 1)
    if _use_reference:
        cnt, idx, g, csc_ptr, csc_slot = split_reference(cnt0, idx0, val0, hot_mask, Wc)
        need = None
    else:
        cnt, idx, g, csc_ptr, csc_slot, _, need = split_pack(cnt0, idx0, val0, hot_mask, Wc, flags=True)
    if SYNC_FREE["enabled"] and need is not None:
        if len(_CAPS) > 4096:
            _CAPS.clear()
        a, b = CAP_HEADROOM
        w_need = int(need.max()) if M else 0   # same sync point as above, already waited for
        _CAPS[key] = [K, max(8, -(-(int(w_need * a) + b) // 8) * 8)]
    hot = order[:K]
    heavy = (torch.argsort(light.to(torch.int8), stable=True)[:R] if R
             else torch.zeros(0, dtype=torch.int64, device=dev))
    return HybridPattern(fire, cnt, idx, g, csc_ptr, csc_slot, hot, heavy, ~hot_mask)
