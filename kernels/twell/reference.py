"""Pure-torch references: what the Triton kernels must equal (tests) and the CPU fallback."""
from __future__ import annotations

import torch

from .format import TwellActs, pack_reference


def gate_reference(x: torch.Tensor, w_gate: torch.Tensor) -> torch.Tensor:
    """relu(x W_g^T) in fp32 [M, H]."""
    return torch.relu(x.float() @ w_gate.float().t())


def gate_twell_reference(x: torch.Tensor, w_gate: torch.Tensor, tile: int, cap: int,
                         col0: int = 0) -> TwellActs:
    """What the gate kernel writes: TwELL of relu(x W_g^T), values in x's dtype."""
    return pack_reference(gate_reference(x, w_gate).to(x.dtype), tile, cap, col0)


def ffn_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                  w_down: torch.Tensor) -> torch.Tensor:
    """y = (relu(x W_g^T) * (x W_u^T)) W_d^T, computed in fp32, returned in fp32.
    Weights in nn.Linear layout: w_gate, w_up [H, D], w_down [D, H]."""
    xf = x.float()
    h = torch.relu(xf @ w_gate.float().t()) * (xf @ w_up.float().t())
    return h @ w_down.float().t()


def twell_ffn_reference(x: torch.Tensor, weights) -> torch.Tensor:
    """twell_ffn's contract in pure torch (CPU fallback): same inputs, output in x's dtype."""
    return ffn_reference(x, weights.w_gate_orig(), weights.w_up_orig(), weights.w_down_orig()).to(x.dtype)
