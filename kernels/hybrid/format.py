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

Host synchronisation: building this costs ONE device-to-host read per layer forward (R heavy
rows, K hot neurons, Wc) so that buffers are sized exactly and dense backups run through cuBLAS
with exact shapes. Backward has none. It prevents CUDA-graph capture of the layer (see NOTES.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .gate_pack import gate_pack
from .row_pack import cublas_gate_pack
from .split_pack import reference as split_reference
from .split_pack import split_pack


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
    heavy: torch.Tensor     # [R] int64: heavy token ids
    cold_mask: torch.Tensor  # [H] bool: neurons outside the hot set (used by the heavy backup)

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
    hot_mask = torch.zeros(H, dtype=torch.bool, device=dev)
    hot_mask[order] = torch.arange(H, device=dev) < n_hot
    zero = torch.zeros((), dtype=cnt0.dtype, device=dev)
    # Wc = the largest light-token count bounds every light token's cold count.
    stats = torch.stack([(~light).sum().to(cnt0.dtype), hot_mask.sum().to(cnt0.dtype),
                         torch.where(light, cnt0, 0).max() if M else zero])
    R, K, Wc = (int(v) for v in stats.tolist())  # the one host sync of the layer
    Wc = max(Wc, 1)
    cnt, idx, g, csc_ptr, csc_slot = (split_reference if _packed is not None and _use_reference
                                      else split_pack)(cnt0, idx0, val0, hot_mask, Wc)
    hot = order[:K]
    heavy = (torch.argsort(light.to(torch.int8), stable=True)[:R] if R
             else torch.zeros(0, dtype=torch.int64, device=dev))
    return HybridPattern(fire, cnt, idx, g, csc_ptr, csc_slot, hot, heavy, ~hot_mask)
