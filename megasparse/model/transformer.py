"""A Llama-shaped decoder whose FFN is the ReLU-gated sparse MLP (or a dense SwiGLU baseline).

The forward returns the CE loss and the sparsity side outputs (the per-layer L1 terms and fire
counts) rather than logits, so the loss can be computed without materialising full-vocabulary
logits under tensor parallelism, and so the trainer gets its statistics with no extra pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megasparse.config import ModelConfig
from megasparse.model.attention import Attention, RMSNorm, rotary_tables
from megasparse.model.sparse_mlp import ReluGatedMLP, SwiGLUMLP


@dataclass
class ModelOutput:
    ce_loss: torch.Tensor | None         # 0-dim fp32, mean over tokens (None without labels)
    aux_loss: torch.Tensor               # 0-dim fp32, mean over layers of the layers' L1 terms
    l1_per_layer: torch.Tensor           # [n_layers] fp32, detached
    fire_counts: list                    # per layer: [H_local] int32 (tokens with g_j > 0) or None
    tokens: int                          # tokens in this micro-batch
    logits: torch.Tensor | None = None   # only when no labels were given


def plain_linear(in_features: int, out_features: int, kind: str) -> nn.Linear:
    """Default projection factory (no tensor parallelism): a bias-free nn.Linear."""
    return nn.Linear(in_features, out_features, bias=False)


class ParallelPlan:
    """How layers are built and sharded. The default is a single rank; tensor parallelism
    provides one with parallel layers and mappings (megasparse/parallel/)."""

    tp_size = 1
    linear = staticmethod(plain_linear)

    def embedding(self, vocab: int, dim: int) -> nn.Module:
        return nn.Embedding(vocab, dim)

    def mlp_regions(self):
        """(enter, leave) mappings around the sparse MLP's local computation."""
        return (lambda t: t), (lambda t: t)

    def lm_head(self, dim: int, vocab: int) -> nn.Module:
        return nn.Linear(dim, vocab, bias=False)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))

    def lm_logits(self, hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        return hidden @ head_weight.t()


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ParallelPlan):
        super().__init__()
        tp = plan.tp_size
        kv_heads = max(cfg.n_kv_heads // tp, 1)  # kv heads are replicated when tp > n_kv_heads
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads // tp, kv_heads, cfg.head_dim, plan.linear)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.mlp == "relu_gated":
            enter, leave = plan.mlp_regions()
            self.mlp = ReluGatedMLP(cfg.d_model, cfg.ffn_hidden // tp, cfg.mlp_backend,
                                    cfg.sparse_nnz_threshold, enter, leave)
        else:
            self.mlp = SwiGLUMLP(cfg.d_model, cfg.ffn_hidden // tp, plan.linear)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        y, l1, fire_counts = self.mlp(self.mlp_norm(x))
        return x + y, l1, fire_counts


class SparseLlama(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ParallelPlan | None = None):
        super().__init__()
        self.cfg = cfg
        self.plan = plan or ParallelPlan()
        self.embed = self.plan.embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderBlock(cfg, self.plan) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else self.plan.lm_head(cfg.d_model, cfg.vocab_size)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std); output projections of each residual branch scaled by
        1/sqrt(2 n_layers) (GPT-2), so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("o_proj.weight", "down_weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        seq = input_ids.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(input_ids)
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        l1_terms, fire_counts = [], []
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, l1, counts = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x, l1, counts = layer(x, cos, sin)
            l1_terms.append(l1)
            fire_counts.append(counts)
        l1_stack = torch.stack(l1_terms)
        hidden = self.norm(x)
        logits = self.plan.lm_logits(hidden, self.head_weight())
        ce = None if labels is None else self.plan.cross_entropy(logits, labels)
        return ModelOutput(ce_loss=ce, aux_loss=l1_stack.mean(), l1_per_layer=l1_stack.detach(),
                           fire_counts=fire_counts, tokens=input_ids.numel(),
                           logits=logits if labels is None else None)

    def set_measured_nnz(self, fractions: list[float]) -> None:
        """Per-layer measured nnz/H, which the `auto` backend compares with its threshold."""
        for layer, frac in zip(self.layers, fractions):
            if isinstance(layer.mlp, ReluGatedMLP):
                layer.mlp.measured_nnz_fraction = float(frac)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n
