"""Rotary position embedding (rotate-half form, as Llama and Hugging Face write it) in one pass.

For x [B, T, heads, d] and tables cos, sin [>= T, d/2] (fp32, or bf16 in a model cast whole), with x1, x2 the two halves of the
last dimension:

    out = cat(x1 * cos[t] - x2 * sin[t],  x1 * sin[t] + x2 * cos[t])

computed in fp32 and rounded once to x's dtype. The torch form of this (`rotary_reference`)
takes about ten elementwise passes over fp32 copies of q and k (upcast, two halves, four
products, two sums, a concatenation, the downcast). The Triton kernel (kernel.py) reads x once
and writes the result once, and its backward is the same rotation by the opposite angle (the
transpose of a rotation), so it is one pass too.

x is taken in the projection's own [B, T, heads, d] layout, before attention's transpose, so
no copy is made for the kernel; `F.scaled_dot_product_attention` reads the transposed view.
This module imports Triton only when the kernel runs (CUDA), so CPU installs need none.
"""
from __future__ import annotations

import torch


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The pure-torch definition (and CPU path): x [B, T, heads, d]; cos/sin [>= T, d/2]."""
    t = x.shape[1]
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:t, None, :], sin[:t, None, :]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Differentiable rotary embedding of x [B, T, heads, d]: the kernel on CUDA, the reference
    on CPU (tests run the kernel itself under the Triton interpreter through RotaryFunction)."""
    if x.is_cuda:
        from .kernel import RotaryFunction
        return RotaryFunction.apply(x, cos, sin)
    return rotary_reference(x, cos, sin)
