"""The L1 coefficient lambda(step): a delay, a ramp, then a constant; or a target-sparsity controller.

The trainer only uses this interface, so schedules and the controller plug in here:
``coeff(step)`` gives lambda for the step about to run, ``observe(step, record)`` feeds back the
log-interval metrics (a controller reacts; a schedule ignores it) and returns extra metrics to log
(e.g. ``nnz_target``), and the state round-trips through checkpoints.

Shape (``sparsity.*``): lambda = 0 for step < delay_steps; then over ramp_steps it goes from
l1_start to l1_coeff (linear, cosine or exponential = geometric); then it holds l1_coeff.
A ramp matters because a large L1 on a freshly initialised model kills neurons before they
learn anything; a delay lets the dense model find useful features first.
"""
from __future__ import annotations

import math

from megasparse.config import SparsityConfig


def ramp_value(shape: str, start: float, end: float, t: float) -> float:
    """lambda at fraction t in [0, 1] of the ramp."""
    t = min(max(t, 0.0), 1.0)
    if shape == "linear":
        return start + (end - start) * t
    if shape == "cosine":  # slow start and slow finish: no kink where the ramp meets the plateau
        return start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * t))
    if shape == "exponential":  # equal multiplicative steps: the response of nnz is roughly log-linear
        return start * (end / start) ** t
    raise ValueError(f"unknown ramp shape {shape!r}")


class L1Schedule:
    """lambda(step) as a pure function of the step and the config (its state is only a record of
    the config, so a resumed run with an edited schedule follows the new config)."""

    def __init__(self, cfg: SparsityConfig):
        self.cfg = cfg

    def scheduled(self, step: int) -> float:
        c = self.cfg
        if step < c.delay_steps:
            return 0.0
        if c.schedule == "constant" or step >= c.ramp_end:
            return c.l1_coeff
        return ramp_value(c.schedule, c.l1_start, c.l1_coeff, (step - c.delay_steps) / c.ramp_steps)

    def coeff(self, step: int) -> float:
        return self.scheduled(step)

    def observe(self, step: int, record: dict) -> dict:
        return {}

    def state_dict(self) -> dict:
        c = self.cfg
        return {"kind": "schedule", "schedule": c.schedule, "l1_start": c.l1_start, "l1_coeff": c.l1_coeff,
                "delay_steps": c.delay_steps, "ramp_steps": c.ramp_steps}

    def load_state_dict(self, state: dict) -> None:
        pass  # stateless: see the class docstring


# Kept for callers of the first version of this module.
ConstantL1 = L1Schedule


def build_l1_schedule(cfg: SparsityConfig, hidden_size: int | None = None):
    """The schedule, or the controller when ``sparsity.controller`` is set. ``hidden_size`` (the
    global H) lets a controller log its target in neurons per token whichever unit was given."""
    if cfg.controller != "none":
        from megasparse.sparsity.controller import SparsityController

        return SparsityController(cfg, hidden_size)
    return L1Schedule(cfg)
