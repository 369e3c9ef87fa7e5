"""The hybrid sparse format used for training: cold ELL + per-neuron CSC + two dense backups.

An activation (token i, neuron j) with g_ij > 0 lands in exactly one of three parts:
  * hot neurons (fire_counts[j] > hot_frac * M, rounded up to a multiple of 64): a dense [M, K] panel over all tokens. A neuron
    that fires for more than ~1% of tokens is cheaper through a tensor-core GEMM than through
    per-activation row gathers (the gather moves 2*D bytes per activation, the GEMM 2*M*D flops
    per neuron). This is the dense backup in the neuron direction, and it bounds the length of
    every cold neuron's CSC segment by hot_frac * M.
  * heavy tokens (more than `ell_width` nonzeros): the gate epilogue could not store them all, so
    their cold part is recomputed densely from x in forward and backward (heavy_rows.py): the
    dense backup in the token direction. Never truncated: their true count comes from the epilogue.
    The split kernel lists them on the device; the kernels read the count from memory.
  * everything else, the cold tail, as a per-token ELL of width ell_width (every light token's
    cold entries fit, so nothing overflows; only used slots are ever read), plus the per-neuron
    (CSC) view of the same slots that the weight-gradient products need: csc_slot lists flat
    ELL slots (i * width + s) sorted by neuron, csc_ptr[j]:csc_ptr[j+1] delimits neuron j.

Host synchronisation. The only size the host needs is K, the number of hot neurons (the shape of
the panel's cuBLAS GEMMs). The first call for a layer (key: w_gate's storage, M, H, ell_width,
hot_frac) reads it from the device, so it is exact. Later calls (SYNC_FREE, the default) take K
remembered from an earlier call and never wait: a stale K is still exact (with fewer hot neurons
than the threshold asks for, the rest stay cold; with more, extra neurons are dense), it only
changes speed. The new K is copied to pinned memory after each call and picked up by a later
call once its copy has landed (an event query, not a wait). So forward and backward have no
host sync at all and the whole layer can be captured in a CUDA graph. With SYNC_FREE off, every
call reads K (one host sync per forward).

ELL width (sync-free path only; with SYNC_FREE off "auto" stays at the first width). A heavy token costs ~1 ms per kernel of its dense backup (three kernels per step) as
soon as one is present, and a trained layer can have thousands (a 0.5B model's last layer, with a
mean of 124 nonzeros per token, had 1,483 of 16,384 tokens over 256: 54 ms per fwd+bwd against
7.5 dense; bench/results/probe_hybrid_width_h100.md). With ell_width="auto" (the default of
sparse_gated_mlp) each layer picks its width from AUTO_WIDTHS: the largest per-token count of a
call travels back with K (same copy, no wait), and the next call grows to the smallest width that
holds it, or shrinks once it fits in 3/8 of the current width (a change of width reads K once;
a CUDA graph capture keeps the width it starts with). When no width holds it (fully dense
tokens), it grows one step only while more than 1/512 of the tokens are heavy.
Wider is not free (ELL arrays are [M, width]), so the first width is the smallest. A token past
the largest width still takes the exact backup.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .gate_pack import gate_pack
from . import row_pack
from .row_pack import count_pass, cublas_gate_pack, pack_pass
from .split_pack import reference as split_reference
from .hot_select import hot_count, select_hot
from .split_pack import split_pack


# Remembered hot counts (see the module docstring). On by default: the end-of-forward host read of
# the previous design cost 0.7 ms of a 3.7 ms step on H100 (NOTES.md variant 15). False: read K
# on every call.
SYNC_FREE = {"enabled": True}
_CAPS: dict = {}               # layer key -> K (hot neurons), from an earlier call
_PENDING: dict = {}            # layer key -> (pinned [K_needed, heavy rows, max count] copy, its event)
LAST_STATS: dict = {}          # layer key -> (K_needed, heavy rows) of the last call read back
_MAX_COUNT: dict = {}          # layer key -> largest per-token nonzero count of that call (0 unless "auto")
_WIDTHS: dict = {}             # layer key without the width -> ell_width="auto"'s next width
AUTO_WIDTHS = (256, 512, 1024, 2048)   # ell_width="auto" picks among these (see the docstring)


# How the gate GEMM is done: the fused Triton GEMM+pack epilogue, or cuBLAS then a pack pass
# (faster on H100 today, NOTES.md). Both give the same pattern up to fp32-vs-bf16 rounding of g.
# hot_from_pack: pass 2 of the cuBLAS path copies the hot columns of g for the panel (whose GEMM
# then computes u only). Off by default: its scattered 2-byte stores cost more than the half GEMM
# saves (H100, same process: 2.779 vs 2.740 ms per step from a CUDA graph; NOTES.md variant 17).
GATE = {"fused_epilogue": False, "hot_from_pack": False}


@dataclass
class HybridPattern:
    fire: torch.Tensor      # [H] int32: tokens with g_j > 0 (all parts)
    cnt: torch.Tensor       # [M] int32: cold nonzeros of a light token (0 for heavy tokens)
    idx: torch.Tensor       # [M, W] int32: neuron of each cold slot (slots >= cnt unspecified)
    g: torch.Tensor         # [M, W] fp32: g (> 0) at each cold slot (slots >= cnt unspecified)
    csc_ptr: torch.Tensor   # [H + 1] int32
    csc_slot: torch.Tensor  # [M * W] int32: flat slots sorted by neuron (tail past csc_ptr[H] unused)
    hot: torch.Tensor       # [K] int64: hot neuron ids
    heavy: torch.Tensor     # [M] int32: heavy token ids in the first n_heavy[0] entries
    n_heavy: torch.Tensor   # [1] int32 (on the device)
    cold_mask: torch.Tensor  # [H] int8: 1 for neurons outside the hot set (used by the heavy backup)
    hot_pos: torch.Tensor   # [H] int32: index of a hot neuron in `hot`, -1 for cold ones
    g_hot: torch.Tensor | None = None  # [M, K] g of the hot neurons (x's dtype) when the pack made it

    @property
    def width(self) -> int:
        return self.idx.shape[1]

    def heavy_rows(self) -> torch.Tensor:
        """The heavy token ids (reads the count: a host sync, for tests and diagnostics)."""
        return self.heavy[:int(self.n_heavy[0])].long()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.fire, self.cnt, self.idx, self.g, self.csc_ptr, self.csc_slot, self.hot,
                    self.heavy, self.n_heavy, self.cold_mask, self.hot_pos))


def _panel_size(over_threshold: int, multiple: int, H: int) -> int:
    """K: the neurons over the threshold, rounded up to a multiple of `multiple` (at most H)."""
    return min(-(-over_threshold // multiple) * multiple, H)


def _remembered_hot_count(key, multiple: int, H: int):
    """K from an earlier call of this layer, after picking up any copy that has landed."""
    pending = _PENDING.get(key)
    if pending is not None and pending[1] is not None and torch.cuda.is_current_stream_capturing():
        pending = None     # no event queries inside a graph capture
    if pending is not None and (pending[1] is None or pending[1].query()):
        del _PENDING[key]
        over, heavy, max_count = (int(v) for v in pending[0].tolist())
        _CAPS[key] = _panel_size(over, multiple, H)
        LAST_STATS[key] = (_CAPS[key], heavy)
        _MAX_COUNT[key] = max_count
    return _CAPS.get(key)


def next_auto_width(width: int, max_count: int | None, heavy: int = 0, tokens: int = 0) -> int:
    """ell_width="auto": the width after a call at `width` whose largest per-token count was
    max_count, with `heavy` of its `tokens` tokens over the width (max_count None: nothing read
    back yet, keep it).

    The smallest width that holds the heaviest token, grown at once and shrunk with a margin. If
    no width holds it (fully dense tokens), the backup's fixed cost is paid anyway: then grow
    one step only while more than 1/512 of the tokens are heavy (a 0.5B model's first layer,
    whose tokens reach 5023 nonzeros: 7.01 ms at 512 with 37 of 16,384 heavy, 7.73 at 2048 with
    3; probe_hybrid_width_h100.md), so one outlier does not buy an [M, 2048] ELL."""
    if max_count is None:
        return width
    fit = next((w for w in AUTO_WIDTHS if w >= max_count), None)
    if fit is None:
        wider = [w for w in AUTO_WIDTHS if w > width]
        return wider[0] if wider and heavy * 512 > tokens else width
    if fit > width or (fit < width and max_count <= 3 * width // 8):
        return fit
    return width


def _auto_width(layer, multiple: int, H: int, M: int) -> int:
    """The width of this call for layer key `layer`, from what its previous call sent back.
    Inside a CUDA graph capture it stays put: a new width would need a host read of K."""
    width = _WIDTHS.get(layer, AUTO_WIDTHS[0])
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return width
    prev = layer + (min(width, H),)
    _remembered_hot_count(prev, multiple, H)      # picks up the previous call's copy if it landed
    width = next_auto_width(width, _MAX_COUNT.pop(prev, None), LAST_STATS.get(prev, (0, 0))[1], M)
    _WIDTHS[layer] = width
    return width


def _send_back(key, stats):
    """Start the copy of this call's stats ([neurons over the hot threshold, heavy rows, largest
    per-token count], int32 on the device) to the host; nobody waits for it."""
    if stats.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return    # a replayed graph keeps the K it was captured with
        host = torch.empty(stats.numel(), dtype=torch.int32, pin_memory=True)
        host.copy_(stats, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        _PENDING[key] = (host, event)
    else:
        _PENDING[key] = (stats, None)
    if len(_CAPS) > 4096:       # e.g. a run that keeps changing M: forget, re-learn per layer
        for d in (_CAPS, _PENDING, LAST_STATS, _MAX_COUNT, _WIDTHS):
            d.clear()


def build_pattern(x: torch.Tensor, w_gate: torch.Tensor, ell_width: int | str, hot_frac: float | None,
                  _packed=None, _use_reference: bool = False, hot_multiple: int = 64) -> HybridPattern:
    """Run the gate GEMM + epilogue pack, then split into hot / heavy / cold parts.

    `ell_width` is an int or "auto" (per layer, from AUTO_WIDTHS; see the module docstring).
    `hot_frac=None` disables the hot dense panel (every neuron goes through the CSC path).
    `_packed` lets tests inject gate_pack's output (e.g. from its reference), and
    `_use_reference` then builds the split with the pure-torch reference.
    """
    M = x.shape[0]
    H = w_gate.shape[0]
    dev = x.device
    layer = (dev.type, dev.index, w_gate.untyped_storage().data_ptr(), w_gate.storage_offset(), M, H,
             hot_frac, hot_multiple)
    auto = ell_width == "auto"
    if auto:
        # without the sync-free copy back (SYNC_FREE off, or the reference split) nothing is
        # learned: "auto" is then the first width
        ell_width = _auto_width(layer, hot_multiple, H, M) if SYNC_FREE["enabled"] and not _use_reference \
            else AUTO_WIDTHS[0]
    width = min(ell_width, H)    # no token has more than H nonzeros: a wider ELL only costs memory
    g_dense = ccnt = g_hot = None
    # One memset for every counter of the call: [neurons over the hot threshold, heavy rows, the
    # largest per-token count] (copied back to the host in one piece), the fire counts, the
    # split's three [H] counters.
    zeroed = torch.zeros(3 + H + 3 * H + 1, dtype=torch.int32, device=dev)
    stats, fire_buf, split_counters = zeroed[:3], zeroed[3:3 + H], zeroed[3 + H:]
    if _packed is not None:
        fire = _packed[0]
    elif GATE["fused_epilogue"]:
        _packed = gate_pack(x, w_gate, width)
        fire = _packed[0]
    elif row_pack.CONFIG.get("TWO_PASS"):   # (the module's current CONFIG: sweeps replace it)
        # cuBLAS gate, pass 1 (counts, fire), then the hot set, then pass 2 (which can also copy
        # the hot columns of g for the panel: GATE["hot_from_pack"])
        g_dense = x @ w_gate.t()
        fire, ccnt = count_pass(g_dense, fire_buf)
    else:
        _packed = cublas_gate_pack(x, w_gate, width)
        fire = _packed[0]
    # Hot set: neurons firing on > hot_frac * M tokens, rounded up to a multiple of
    # `hot_multiple` with the next most popular neurons (cuBLAS falls back to slow sm75 kernels
    # for GEMM sizes like 2K = 490; NOTES.md). The count stays on device; the set is the K most
    # popular neurons (hot_select.py), K from the host (see the module docstring).
    threshold = M if hot_frac is None else int(hot_frac * M)   # (no neuron fires on more than M)
    key = layer + (width,)
    K = (_remembered_hot_count(key, hot_multiple, H) if SYNC_FREE["enabled"] and not _use_reference
         else None)
    if K is None:
        hot_count(fire, threshold, stats)
        K = _panel_size(int(stats[0]), hot_multiple, H)   # the host read of a layer's first call
        if not _use_reference:
            _CAPS[key] = K
    hot, cold, hot_pos = select_hot(fire, min(K, H), threshold, stats)
    if g_dense is not None:
        cnt0, idx0, val0, g_hot = pack_pass(g_dense, ccnt, width,
                                            (hot_pos, K) if K and GATE["hot_from_pack"] else None)
        del g_dense
    else:
        _, cnt0, idx0, val0 = _packed
    W0 = idx0.shape[1]
    n_heavy = stats[1:2]
    if _use_reference:
        cnt, idx, g, csc_ptr, csc_slot = split_reference(cnt0, idx0, val0, cold == 0, W0)
        rows = (cnt0 > W0).nonzero().flatten()
        heavy = torch.zeros(M, dtype=torch.int32, device=dev)
        heavy[:rows.numel()] = rows.to(torch.int32)
        n_heavy.fill_(rows.numel())
    else:
        cnt, idx, g, csc_ptr, csc_slot, heavy, _ = split_pack(cnt0, idx0, val0, cold, W0, n_heavy=n_heavy,
                                                             counters=split_counters)
    if SYNC_FREE["enabled"] and not _use_reference:
        if auto and M:   # what the next call's width is chosen from; one launch, so only here
            torch.amax(cnt0, dim=0, keepdim=True, out=stats[2:3])   # the true counts, heavy tokens included
        _send_back(key, stats)
    return HybridPattern(fire, cnt, idx, g, csc_ptr, csc_slot, hot, heavy, n_heavy, cold, hot_pos, g_hot)
