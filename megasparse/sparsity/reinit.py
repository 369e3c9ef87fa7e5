"""Dead-neuron re-initialisation: fresh gate/up rows and down columns, and reset optimizer state.

A neuron that never fired in a whole statistics window is dead: its gate row g_j never crosses
zero, so it gets no gradient (relu' = 0) and stays dead. We draw its gate and up rows and its
down column again from the model's init distribution and zero its Adam moments (exp_avg,
exp_avg_sq), so stale moments do not push the fresh weights. Adam's step counter is per tensor
and stays; with zeroed moments the first update of a fresh row is about 0.45 lr in size, which is
bounded. Everything else, weights and optimizer state, is left bit-identical.

Where the weights live depends on DeepSpeed's mode, and each has its own write path:
- ZeRO-1/2 (and the bf16 optimizer): every rank holds the full model (low-precision) params; the
  fp32 master and Adam moments are flat per-rank partitions. ``param._hp_mapping`` maps the
  param's slice of a partition; ``deepspeed.utils.safe_{get,set}_full_fp32_param`` and
  ``safe_{get,set}_full_optimizer_state`` gather (an all-reduce over DP) and scatter through it.
  The model param is then overwritten too (DeepSpeed copies master -> model only after a step).
- ZeRO-3: the param itself is a partition (``ds_id``); the same safe_* APIs work through the
  ZeRO-3 optimizer (all-gather over DP), and the low-precision partition is rewritten inside
  ``GatheredParameters(modifier_rank=0)``.
- No ZeRO partitioning (stage 0 in fp32): plain params and ``optimizer.state[param]``.
Every DP rank must call this with the same masks (they are DP-reduced) because the gathers are
collectives; under TP each rank passes the masks of its own shard.
"""
from __future__ import annotations

import math

import torch

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _torch_optimizer(optimizer):
    """The object whose ``.state[param]`` holds Adam moments in the un-partitioned case."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class _ParamAccess:
    """Read-modify-write of one parameter's full fp32 value and optimizer moments."""

    def __init__(self, param, optimizer):
        self.p = param
        self.zero3 = hasattr(param, "ds_id")
        # hasattr, not "is not None": a param wholly outside this rank's partition has
        # _hp_mapping None but must still join the gather's all-reduce.
        self.hp = hasattr(param, "_hp_mapping")
        self.opt = None if (self.zero3 or self.hp) else _torch_optimizer(optimizer)

    def get(self, key: str | None = None) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.zero3 or self.hp:
            try:
                value = safe_get_full_fp32_param(self.p) if key is None else safe_get_full_optimizer_state(self.p, key)
            except (KeyError, ValueError, TypeError):
                return None  # no optimizer state yet (before the first step): nothing to reset
            return None if value is None else value.clone()
        if key is None:
            return self.p.data.detach().float().clone()
        state = self.opt.state.get(self.p, {}) if self.opt is not None else {}
        return state[key].detach().clone() if key in state else None

    def set(self, value: torch.Tensor, key: str | None = None) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if self.zero3 or self.hp:
            if key is None:
                safe_set_full_fp32_param(self.p, value)
                self._set_model_param(value)
            else:
                safe_set_full_optimizer_state(self.p, value, key)
            return
        if key is None:
            self.p.data.copy_(value.to(self.p.dtype))
        else:
            self.opt.state[self.p][key].copy_(value)

    def _set_model_param(self, value: torch.Tensor) -> None:
        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([self.p], modifier_rank=0):
                self.p.data.copy_(value.reshape(self.p.ds_shape).to(self.p.dtype))
        else:
            self.p.data.copy_(value.reshape(self.p.shape).to(self.p.dtype))


def _rewrite(param, optimizer, index: torch.Tensor, dim: int, fresh: torch.Tensor) -> None:
    access = _ParamAccess(param, optimizer)
    full = access.get()
    full.index_copy_(dim, index.to(full.device), fresh.to(full.device, full.dtype))
    access.set(full)
    for key in _MOMENTS:
        state = access.get(key)
        if state is not None:
            state.index_fill_(dim, index.to(state.device), 0.0)
            access.set(state, key)


def reinit_dead_neurons(model, optimizer, dead_masks: list, init_std: float, seed: int = 0,
                        down_std: float | None = None) -> list[int]:
    """Re-initialise, per layer, the neurons where ``dead_masks[layer]`` ([H_local] bool) is True.

    ``model`` is the module (``engine.module``) with ``layers[i].mlp`` ReLU-gated MLPs;
    ``optimizer`` is ``engine.optimizer`` (DeepSpeed's ZeRO optimizer or a torch optimizer).
    ``seed`` must be equal on DP ranks (they write the same values) and should differ across TP
    ranks and calls (e.g. hash of step and TP rank). Returns the count re-initialised per layer.
    """
    n_layers = len(model.layers)
    if down_std is None:  # the model's init for residual output projections (GPT-2 scaling)
        down_std = init_std / math.sqrt(2 * n_layers)
    counts = []
    for layer_idx, (layer, mask) in enumerate(zip(model.layers, dead_masks)):
        mlp = layer.mlp
        index = torch.nonzero(mask.cpu(), as_tuple=False).flatten()
        counts.append(int(index.numel()))
        if index.numel() == 0 or not hasattr(mlp, "gate_weight"):
            continue
        d_model = getattr(mlp.gate_weight, "ds_shape", mlp.gate_weight.shape)[1]
        gen = torch.Generator().manual_seed(seed * 1000003 + layer_idx)
        k = index.numel()
        _rewrite(mlp.gate_weight, optimizer, index, 0, torch.randn(k, d_model, generator=gen) * init_std)
        _rewrite(mlp.up_weight, optimizer, index, 0, torch.randn(k, d_model, generator=gen) * init_std)
        _rewrite(mlp.down_weight, optimizer, index, 1, torch.randn(d_model, k, generator=gen) * down_std)
    return counts


class DeadNeuronReinit:
    """The periodic policy the trainer calls at every log interval (after stats are reduced):
    re-initialise once ``reinit_interval`` steps have passed since the last time, if the
    statistics window is full. The window is kept: a fresh neuron that fires clears itself, and
    one that never fires again was rightly re-initialised again."""

    def __init__(self, cfg, init_std: float, seed: int, tp_rank: int = 0):
        self.cfg, self.init_std, self.seed, self.tp_rank = cfg, init_std, seed, tp_rank
        self.last_step = 0

    def __call__(self, step: int, stats, engine) -> dict:
        c = self.cfg
        if not c.reinit_dead or step - self.last_step < c.reinit_interval or not stats.window_full():
            return {}
        if c.reinit_until_step is not None and step > c.reinit_until_step:
            return {}
        counts = reinit_dead_neurons(engine.module, engine.optimizer, stats.dead_masks(), self.init_std,
                                     seed=hash((self.seed, step, self.tp_rank)) % 2**31)
        self.last_step = step
        return {"reinit_neurons_layer": counts, "reinit_neurons": sum(counts)}

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = state.get("last_step", 0)
