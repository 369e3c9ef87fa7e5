"""FLOP accounting. "Model" FLOPs are the dense-equivalent count (what MFU is quoted against);
"executed" FLOPs discount the MLP products that a sparse backend skips."""
from __future__ import annotations

import os

import torch

from megasparse.config import ModelConfig

# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts), for MFU.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "GH200": 989.0}


def peak_flops(device: torch.device) -> float | None:
    """Per-device peak FLOP/s; MEGASPARSE_PEAK_TFLOPS overrides; None on CPU (MFU unreported)."""
    if "MEGASPARSE_PEAK_TFLOPS" in os.environ:
        return float(os.environ["MEGASPARSE_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def _mlp_dense_forward_per_token(cfg: ModelConfig) -> float:
    return 3 * 2 * cfg.d_model * cfg.ffn_hidden


def _non_mlp_forward_per_token(cfg: ModelConfig, seq_len: int) -> float:
    d, L = cfg.d_model, cfg.n_layers
    kv = cfg.n_kv_heads * cfg.head_dim
    attn_proj = 2 * d * (2 * d + 2 * kv)               # q, o and k, v projections
    attn_scores = 2 * 2 * seq_len * d                  # QK^T and AV (full-matrix convention, as PaLM)
    head = 2 * d * cfg.vocab_size
    return L * (attn_proj + attn_scores) + head


def model_flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Dense-equivalent FLOPs per token; training counts forward + backward (3x forward)."""
    fwd = _non_mlp_forward_per_token(cfg, seq_len) + cfg.n_layers * _mlp_dense_forward_per_token(cfg)
    return 3 * fwd if training else fwd


def executed_flops_per_token(cfg: ModelConfig, seq_len: int, nnz_fractions: list[float],
                             sparse_layers: list[bool], training: bool = True) -> float:
    """FLOPs actually executed: in a layer on a sparse backend, only the gate GEMM is dense and
    every other MLP product scales with nnz/H (DESIGN.md: 1 of 3 dense in inference, 1 of 9 in
    training)."""
    mult = 3 if training else 1
    total = mult * _non_mlp_forward_per_token(cfg, seq_len)
    one_product = 2 * cfg.d_model * cfg.ffn_hidden
    for frac, sparse in zip(nnz_fractions, sparse_layers):
        if not sparse:
            total += mult * 3 * one_product
        else:
            products = 9 if training else 3
            total += one_product * (1 + (products - 1) * frac)
    return total
