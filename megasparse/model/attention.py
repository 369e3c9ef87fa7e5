"""Causal self-attention with rotary embeddings and grouped-query heads (Llama shape, no biases)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.rotary import rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused RMSNorm (one pass on CUDA, forward and backward) normalises in fp32, as
        # it must: bf16 sums of squares lose too much precision at large d_model. The torch form
        # (upcast, square, mean, rsqrt, two products, downcast) took ~6 passes over fp32 copies.
        # It multiplies by the gain in fp32 and rounds once, where Llama's form rounds x/rms to
        # x's dtype before the gain: equal in fp32, within one bf16 rounding in bf16.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim/2] for the rotate-half formulation."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, head_dim] (the projection's layout); cos/sin: [>= T, head_dim/2].
    One Triton pass on CUDA (kernels/rotary), the fp32 torch form on CPU."""
    return rotary(x, cos, sin)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class Attention(nn.Module):
    """Q/K/V and output projections, built by ``linear_factory(in, out, kind, **sharding)``.

    ``n_heads`` and ``n_kv_heads`` are the model's totals. Under tensor parallelism (``tp_size``
    > 1) this rank computes ``n_heads/tp`` query heads and ``max(n_kv_heads/tp, 1)`` kv heads:
    Q/K/V are column-parallel and the output projection row-parallel, so attention itself needs
    no communication. When tp > n_kv_heads each kv head is replicated on tp/n_kv_heads
    consecutive ranks (exactly the ranks whose query heads read it). ``enter_region`` is applied
    once to the input shared by Q, K and V, so its gradient is all-reduced once, not three times.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, linear_factory,
                 tp_size: int = 1, enter_region=None):
        super().__init__()
        if n_heads % tp_size or not (n_kv_heads % tp_size == 0 or tp_size % n_kv_heads == 0):
            raise ValueError(f"tp={tp_size} must divide n_heads={n_heads}, and divide or be a multiple "
                             f"of n_kv_heads={n_kv_heads}")
        if tp_size > 1 and enter_region is None:
            raise ValueError("tensor-parallel attention needs enter_region (the plan's copy-to-region)")
        self.n_heads, self.head_dim = n_heads // tp_size, head_dim
        self.n_kv_heads = max(n_kv_heads // tp_size, 1)
        kv_replicas = max(tp_size // n_kv_heads, 1)
        self.enter_region = enter_region or _identity
        self.q_proj = linear_factory(d_model, n_heads * head_dim, "column", input_in_region=True)
        self.k_proj = linear_factory(d_model, n_kv_heads * head_dim, "column", input_in_region=True,
                                     replicas=kv_replicas)
        self.v_proj = linear_factory(d_model, n_kv_heads * head_dim, "column", input_in_region=True,
                                     replicas=kv_replicas)
        self.o_proj = linear_factory(n_heads * head_dim, d_model, "row")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        x = self.enter_region(x)
        # Rotary in the projections' [B, T, heads, d] layout; attention reads transposed views.
        q = apply_rotary(self.q_proj(x).view(bsz, seq, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rotary(self.k_proj(x).view(bsz, seq, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))
