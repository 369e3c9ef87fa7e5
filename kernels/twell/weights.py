"""TwellWeights: the layouts the TwELL kernels want, built once per layer by prepare_weights.

Layouts (all contiguous, the model's dtype):
    w_gate  [H, D]  rows = neurons (the gate GEMM's B operand, read K-contiguous)
    w_up    [H, D]  rows = neurons: a neuron's up row is one contiguous 2*D-byte gather
    w_down_t [H, D] = W_d^T: a neuron's down column becomes a contiguous row, same reason
Neurons may be *permuted* (y does not depend on the order of hidden neurons): `calibrate`
moves the most popular neurons to the front, and the first `n_hot` of them (a multiple of the
tile) are computed densely by tensor-core GEMMs; the others go through TwELL and gathers.
`perm[i]` is the original index of internal neuron i. With n_hot = 0 (prepare_weights' default)
every neuron is sparse and perm is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ._common import check_matrix


@dataclass(frozen=True)
class TwellWeights:
    w_gate: torch.Tensor    # [H, D], internal neuron order
    w_up: torch.Tensor      # [H, D]
    w_down_t: torch.Tensor  # [H, D] = W_d^T
    perm: torch.Tensor      # int64 [H]: internal neuron i is original neuron perm[i]
    tile: int = 128         # T: gate GEMM N tile = TwELL tile
    cap: int = 32           # slots per (row, tile): T / C
    n_hot: int = 0          # first n_hot internal neurons are dense (multiple of tile)

    @property
    def hidden(self) -> int:
        return self.w_gate.shape[0]

    @property
    def d_model(self) -> int:
        return self.w_gate.shape[1]

    def _inv(self) -> torch.Tensor:
        return torch.argsort(self.perm)

    def w_gate_orig(self) -> torch.Tensor:
        return self.w_gate[self._inv()]

    def w_up_orig(self) -> torch.Tensor:
        return self.w_up[self._inv()]

    def w_down_orig(self) -> torch.Tensor:
        return self.w_down_t[self._inv()].t()


def prepare_weights(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *,
                    tile: int = 128, cap: int = 32) -> TwellWeights:
    """nn.Linear layouts (w_gate, w_up [H, D], w_down [D, H]) -> TwellWeights (copies once).

    tile (T) must be a power of two in [16, 256]; cap in [1, T]. Any H and D are legal.
    """
    if not (isinstance(tile, int) and 16 <= tile <= 256 and tile & (tile - 1) == 0):
        raise ValueError(f"tile={tile} must be a power of two in [16, 256]")
    if not (isinstance(cap, int) and 1 <= cap <= tile):
        raise ValueError(f"cap={cap} must be in [1, tile={tile}]")
    if w_gate.dim() != 2:
        raise ValueError(f"w_gate must be [H, D], got shape {list(w_gate.shape)}")
    h, d = w_gate.shape
    check_matrix("w_gate", w_gate, (h, d))
    check_matrix("w_up", w_up, (h, d), w_gate.dtype, w_gate.device)
    check_matrix("w_down", w_down, (d, h), w_gate.dtype, w_gate.device)
    return TwellWeights(w_gate.detach().clone(), w_up.detach().clone(), w_down.detach().t().contiguous(),
                        torch.arange(h, device=w_gate.device), tile, cap, 0)


def reorder(weights: TwellWeights, order: torch.Tensor, n_hot: int) -> TwellWeights:
    """Permute internal neurons by `order` (indices into the current internal order) and mark
    the first n_hot as dense. n_hot must be a multiple of the tile and <= H."""
    t, h = weights.tile, weights.hidden
    if n_hot < 0 or n_hot % t or n_hot > h:
        raise ValueError(f"n_hot={n_hot} must be a multiple of tile={t} in [0, H={h}]")
    order = order.to(weights.w_gate.device)
    return replace(weights, w_gate=weights.w_gate[order].contiguous(), w_up=weights.w_up[order].contiguous(),
                   w_down_t=weights.w_down_t[order].contiguous(), perm=weights.perm[order], n_hot=n_hot)


def calibrate(weights: TwellWeights, fire_counts: torch.Tensor, tokens: int, *, n_hot: int | None = None,
              min_rate: float = 0.006) -> TwellWeights:
    """Move popular neurons to the front and make the first n_hot dense.

    fire_counts [H] are per ORIGINAL neuron (as twell_ffn(..., return_fire_counts=True) returns
    them) over `tokens` tokens of calibration data. If n_hot is None it is the number of neurons
    firing on more than `min_rate` of tokens, rounded up to a whole tile (a dense tile is computed
    whole, so its last columns take the next most popular neurons): a dense neuron costs two extra
    GEMM columns (up and down) for every token, a gathered one two weight rows per activation,
    and on an H100 the two break even near a 0.6% firing rate. At the benchmark layer (D=2048,
    H=5632, nnz 29) that picks 1536 neurons, the best of the n_hot sweep 1024-2048 at M=16384 and
    131072 (bench/results/ffn_infer_nhot_sweep_h100.md), and 768 / 512 at the tensor-parallel
    widths 2816 / 1408.
    Every layout computes the same function; only the speed depends on it.
    """
    if fire_counts.shape != (weights.hidden,):
        raise ValueError(f"fire_counts has shape {list(fire_counts.shape)}, expected [{weights.hidden}]")
    internal = fire_counts.to(weights.perm.device)[weights.perm].float()
    order = torch.argsort(internal, descending=True, stable=True)
    if n_hot is None:
        n, t = int((internal > min_rate * tokens).sum()), weights.tile
        n_hot = min(weights.hidden - weights.hidden % t, -(-n // t) * t)
    return reorder(weights, order, n_hot)
