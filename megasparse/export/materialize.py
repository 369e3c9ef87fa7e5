"""A SparseLlama (one process, tp=1) holding given full weights, built without initialising them.

The model is built on the meta device (no memory, no random draws) and the weights are assigned,
so loading costs one copy of the weights, not an initialisation plus a copy. The rotary tables
(non-persistent buffers) are recomputed for the target device and dtype, as `model.to(dtype)`
would have cast them.
"""
from __future__ import annotations

import torch

from megasparse.config import ModelConfig
from megasparse.errors import CheckpointError


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """name -> full (tp=1) shape of every parameter SparseLlama(cfg) has."""
    from megasparse.model.transformer import ParallelPlan, SparseLlama

    with torch.device("meta"):
        model = SparseLlama(cfg, ParallelPlan(init_seed=0))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_state(state: dict, cfg: ModelConfig, where: str) -> None:
    """Every parameter present with its shape, nothing extra; else a CheckpointError naming them."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        raise CheckpointError(f"{where} does not hold the weights of its recorded model "
                              f"(mlp={cfg.mlp}, tie_embeddings={cfg.tie_embeddings}): {'; '.join(parts)}")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{where}: {name} has shape {list(state[name].shape)} but its recorded model "
                                  f"(d_model={cfg.d_model}, ffn_hidden={cfg.ffn_hidden}, vocab_size={cfg.vocab_size}) "
                                  f"needs {list(shape)}")


def model_from_state(cfg: ModelConfig, state: dict, device="cpu", dtype: torch.dtype | None = None):
    """SparseLlama(cfg) with `state` (our names, full tensors) on device, cast to dtype (None:
    the weights' own dtype). Checks names and shapes first."""
    from megasparse.model.attention import rotary_tables
    from megasparse.model.transformer import ParallelPlan, SparseLlama

    check_state(state, cfg, "the weights")
    if dtype is None:
        dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    device = torch.device(device)
    with torch.device("meta"):
        model = SparseLlama(cfg, ParallelPlan(init_seed=0))
    model.load_state_dict({n: t.to(device=device, dtype=dtype) for n, t in state.items()}, strict=True, assign=True)
    cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)
    model.rope_cos, model.rope_sin = cos.to(dtype), sin.to(dtype)
    return model
