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
    pairs     [M, n_tiles, cap] (value, column) pairs packed in one integer, so the epilogue does
              ONE scattered store per entry (one address tensor instead of two: the gate
              epilogue is register-bound) and the up/down kernel one load:
                bf16/fp16 activations: int32, bits 31..16 = the value's 16 bits (relu(g)),
                                       bits 15..0 = column index *within the tile* (0..T-1);
                fp32 activations:      int64, bits 63..32 = the value's bits, bits 31..0 = column.
              The global column is col0 + t*T + local; local indices fit any H.
    Entries of a (row, tile) are in increasing column order; slots >= min(count, cap) are
    undefined (never read), so the gate kernel writes only real entries: no memset pass.

Bytes per stored activation: 4 (bf16 value + 16-bit index), plus 4 per (row, tile) count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def pair_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.int64 if dtype == torch.float32 else torch.int32


def encode_pairs(values: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(values [...] in bf16/fp16/fp32, local cols [...] ints) -> packed pairs (see above)."""
    if values.dtype == torch.float32:
        return (values.view(torch.int32).to(torch.int64) << 32) | (cols.to(torch.int64) & 0xFFFFFFFF)
    return (values.view(torch.int16).to(torch.int32) << 16) | (cols.to(torch.int32) & 0xFFFF)


def decode_pairs(pairs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """packed pairs -> (values in `dtype`, local cols int32)."""
    if dtype == torch.float32:
        return (pairs >> 32).to(torch.int32).view(torch.float32), (pairs & 0xFFFFFFFF).to(torch.int32)
    return (pairs >> 16).to(torch.int16).view(dtype), (pairs & 0xFFFF).to(torch.int32)


@dataclass
class TwellActs:
    counts: torch.Tensor   # int32 [M, n_tiles]
    pairs: torch.Tensor    # int32/int64 [M, n_tiles, cap]
    dtype: torch.dtype     # activation dtype of the packed values
    tile: int
    cap: int
    col0: int              # first column stored in TwELL (columns before it are dense "hot" ones)
    hidden: int            # H, total columns

    @property
    def n_tiles(self) -> int:
        return self.counts.shape[1]

    @property
    def values(self) -> torch.Tensor:
        return decode_pairs(self.pairs, self.dtype)[0]

    @property
    def cols(self) -> torch.Tensor:
        return decode_pairs(self.pairs, self.dtype)[1]

    def valid(self) -> torch.Tensor:
        """bool [M, n_tiles, cap]: slots that hold an entry."""
        cap = self.pairs.shape[2]
        return torch.arange(cap, device=self.counts.device) < self.counts.clamp(max=cap).unsqueeze(2)

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
    cols = torch.where(valid, order, torch.zeros((), dtype=order.dtype, device=g.device))
    return TwellActs(counts, encode_pairs(values.contiguous(), cols), g.dtype, tile, cap, col0, h)


def unpack_reference(acts: TwellActs, dense_fill: torch.Tensor | None = None) -> torch.Tensor:
    """TwELL -> dense [M, H]. Overflowed (row, tile) pairs cannot be rebuilt from the format
    alone: pass `dense_fill` [M, H] (e.g. the dense gate) to take them from there, otherwise
    a ValueError names how many overflowed. Columns < col0 are left zero."""
    m, nt, cap = acts.pairs.shape
    t = acts.tile
    values, cols = decode_pairs(acts.pairs, acts.dtype)
    out = torch.zeros(m, nt * t, dtype=acts.dtype, device=acts.pairs.device)
    valid = acts.valid()
    glob = cols.long() + (torch.arange(nt, device=out.device) * t).view(1, nt, 1)
    rows = torch.arange(m, device=out.device).view(m, 1, 1).expand_as(glob)
    out[rows[valid], glob[valid]] = values[valid]
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
