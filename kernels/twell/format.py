"""The TwELL (tile-wise ELLPACK) activation format, and its pure-torch pack/unpack reference.

Layout, for a post-ReLU gate activation g [M, H] (already restricted to the columns [col0, H)
that are stored sparsely; see weights.py for the dense "hot" columns [0, col0)):

    tile      T columns per tile (= the gate GEMM's N tile); n_tiles = ceil((H - col0) / T);
              tile t covers columns col0 + t*T ... col0 + t*T + T - 1 (the last one is partial
              when H - col0 is not a multiple of T: its missing columns are never nonzero).
    cap       slots per (row, tile) = T / C; C is the compression factor (default T/32).
    counts    int32 [M, n_tiles]: the TRUE number of nonzeros of (row, tile). It may exceed cap:
              that (row, tile) has OVERFLOWED, only its first cap entries are stored, and every
              consumer must treat the tile densely (our up/down kernel recomputes it from W_g).
              Overflow is therefore never silent and never truncates a result.
    values    [M, n_tiles, cap], the activation dtype: relu(g) at the stored entries.
    cols      int16 [M, n_tiles, cap]: column index *within the tile* (0..T-1), so the global
              column is col0 + t*T + cols. Local indices keep int16 enough for any H.
    Entries of a (row, tile) are in increasing column order; slots >= min(count, cap) are
    undefined (never read), so the gate kernel writes only real entries: no memset pass.

Bytes per stored activation: 2 (bf16 value) + 2 (index), plus 4 per (row, tile) count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TwellActs:
    counts: torch.Tensor   # int32 [M, n_tiles]
    values: torch.Tensor   # [M, n_tiles, cap]
    cols: torch.Tensor     # int16 [M, n_tiles, cap]
    tile: int
    cap: int
    col0: int              # first column stored in TwELL (columns before it are dense "hot" ones)
    hidden: int            # H, total columns

    @property
    def n_tiles(self) -> int:
        return self.counts.shape[1]

    def overflowed(self) -> torch.Tensor:
        """bool [M, n_tiles]: (row, tile) pairs whose nonzeros did not fit in cap slots."""
        return self.counts > self.cap


def n_tiles_for(hidden: int, col0: int, tile: int) -> int:
    return -(-(hidden - col0) // tile)


def pack_reference(g: torch.Tensor, tile: int, cap: int, col0: int = 0) -> TwellActs:
    """Pack a dense activation g [M, H] (zeros = inactive) into TwELL over columns [col0, H)."""
    if g.dim() != 2:
        raise ValueError(f"g must be [M, H], got shape {list(g.shape)}")
    m, h = g.shape
    nt = n_tiles_for(h, col0, tile)
    gs = torch.nn.functional.pad(g[:, col0:], (0, nt * tile - (h - col0))).view(m, nt, tile)
    nz = gs != 0
    counts = nz.sum(2, dtype=torch.int32)
    # Stable sort puts the nonzeros first, in increasing column order.
    order = torch.sort((~nz).to(torch.int8), dim=2, stable=True).indices[:, :, :cap]
    if order.shape[2] < cap:  # cap > tile: pad (slots beyond tile are never valid)
        order = torch.nn.functional.pad(order, (0, cap - order.shape[2]))
    values = torch.gather(gs, 2, order)
    slot = torch.arange(cap, device=g.device)
    valid = slot < counts.clamp(max=cap).unsqueeze(2)
    values = torch.where(valid, values, torch.zeros((), dtype=g.dtype, device=g.device))
    cols = torch.where(valid, order, torch.zeros((), dtype=order.dtype, device=g.device)).to(torch.int16)
    return TwellActs(counts, values, cols, tile, cap, col0, h)


def unpack_reference(acts: TwellActs, dense_fill: torch.Tensor | None = None) -> torch.Tensor:
    """TwELL -> dense [M, H]. Overflowed (row, tile) pairs cannot be rebuilt from the format
    alone: pass `dense_fill` [M, H] (e.g. the dense gate) to take them from there, otherwise
    a ValueError names how many overflowed. Columns < col0 are left zero."""
    m, nt, cap = acts.values.shape
    t = acts.tile
    out = torch.zeros(m, nt * t, dtype=acts.values.dtype, device=acts.values.device)
    valid = torch.arange(cap, device=out.device) < acts.counts.clamp(max=cap).unsqueeze(2)
    glob = acts.cols.long() + (torch.arange(nt, device=out.device) * t).view(1, nt, 1)
    rows = torch.arange(m, device=out.device).view(m, 1, 1).expand_as(glob)
    out[rows[valid], glob[valid]] = acts.values[valid]
    out = out[:, : acts.hidden - acts.col0]
    ovf = acts.overflowed()
    if ovf.any():
        if dense_fill is None:
            raise ValueError(f"{int(ovf.sum())} (row, tile) pairs overflowed cap={cap}; pass dense_fill "
                             f"to unpack them")
        mask = ovf.repeat_interleave(t, dim=1)[:, : out.shape[1]]
        out = torch.where(mask, dense_fill[:, acts.col0:].to(out.dtype), out)
    full = torch.zeros(m, acts.hidden, dtype=out.dtype, device=out.device)
    full[:, acts.col0:] = out
    return full
