"""AdamW with decay/no-decay parameter groups, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from megasparse.config import OptimConfig


def _is_embedding_or_head(name: str) -> bool:
    return name.startswith(("embed.", "lm_head."))


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on matrices only, unless the config asks to decay norms or embeddings too."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm = p.dim() == 1
        skip = (is_norm and not cfg.decay_norms) or (_is_embedding_or_head(name) and not cfg.decay_embeddings)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def adamw_implementation(model: nn.Module, cfg: OptimConfig) -> dict:
    """torch AdamW's kernel choice as keyword arguments. auto: one fused kernel on CUDA (the
    foreach form makes several passes over the fp32 master weights and states: 15.9 ms per step
    for 545M parameters on an H100, docs/performance.md), foreach on CPU. All three compute the
    same update up to fp32 rounding."""
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if all(p.is_cuda for p in model.parameters()) else "foreach"
    return {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # A torch optimizer, not DeepSpeed's FusedAdam: that one JIT-compiles for ~40 s on CPU.
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, weight_decay=cfg.weight_decay, **adamw_implementation(model, cfg))


def lr_multiplier(step: int, cfg: OptimConfig, decay_steps: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at decay_steps, then hold min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(decay_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * cosine


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    decay_steps = cfg.lr_decay_steps or max_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, decay_steps))
