"""The L1 coefficient lambda(step). Today: a constant from `sparsity.l1_coeff`.

The trainer only uses this interface, so schedules and the target-sparsity controller plug in
here: ``coeff(step)`` gives lambda for the step about to run, ``observe(step, stats)`` feeds back
measured sparsity (a controller reacts; a schedule ignores it), and the state round-trips
through checkpoints.
"""
from __future__ import annotations

from megasparse.config import SparsityConfig


class ConstantL1:
    def __init__(self, cfg: SparsityConfig):
        self.value = cfg.l1_coeff

    def coeff(self, step: int) -> float:
        return self.value

    def observe(self, step: int, stats: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def build_l1_schedule(cfg: SparsityConfig) -> ConstantL1:
    return ConstantL1(cfg)
