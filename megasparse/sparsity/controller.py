"""Target-sparsity controller: lambda follows the measured nnz/token towards a user target.

Why log space: nnz responds to lambda roughly as a power law (a decade of lambda moves nnz by a
roughly constant factor), so an error e = log(measured / target) and updates of log(lambda) give a
loop gain that does not depend on where on the curve we are. Updates happen in ``observe``, once
per log interval, on an exponentially smoothed measurement.

- ``multiplicative``: log lambda += clip(gain * e, +-max_step), an integral controller. With a
  bounded step and a gain well below 1/(plant lag in updates) it approaches without overshoot.
- ``pi``: the velocity form, log lambda += clip(kp * (e - e_prev) + gain * e, +-max_step). The
  proportional term on the change of the error brakes while nnz is already falling fast
  (the lag of the model's response is what makes a pure integrator overshoot). The velocity
  form has no integrator state, hence no wind-up when lambda hits its bounds.
A deadband around the target stops the controller from chasing measurement noise, so once in
band lambda stays put. Before ``controller_start_step`` (default: the end of the ramp) lambda
follows the configured schedule, which warm-starts the controller at ``l1_coeff``.
"""
from __future__ import annotations

import math

from megasparse.config import SparsityConfig
from megasparse.sparsity.schedule import L1Schedule


class SparsityController:
    def __init__(self, cfg: SparsityConfig, hidden_size: int | None = None):
        self.cfg = cfg
        self.schedule = L1Schedule(cfg)
        self.hidden_size = hidden_size
        self.start_step = cfg.ramp_end if cfg.controller_start_step is None else cfg.controller_start_step
        self.active = False
        self.log_lam = 0.0
        self.smoothed: float | None = None   # EMA of the measurement, in the target's unit
        self.prev_error = 0.0
        self.updates = 0

    # ------------------------------------------------------------------ target and measurement
    def _measure(self, record: dict) -> float | None:
        """The mean over layers of nnz/token, in the unit the target was given in."""
        if self.cfg.target_nnz_fraction is not None:
            fractions = record.get("nnz_fraction_layer")
            return sum(fractions) / len(fractions) if fractions else None
        return record.get("nnz_per_token")

    @property
    def target(self) -> float:
        c = self.cfg
        return c.target_nnz_fraction if c.target_nnz_fraction is not None else c.target_nnz_per_token

    def _target_metrics(self) -> dict:
        c, h = self.cfg, self.hidden_size
        out = {}
        if c.target_nnz_per_token is not None:
            out["nnz_target"] = c.target_nnz_per_token
            if h:
                out["nnz_target_fraction"] = c.target_nnz_per_token / h
        else:
            out["nnz_target_fraction"] = c.target_nnz_fraction
            if h:
                out["nnz_target"] = c.target_nnz_fraction * h
        return out

    # ------------------------------------------------------------------ the interface
    def coeff(self, step: int) -> float:
        if self.active:
            return math.exp(self.log_lam)
        return self.schedule.scheduled(step)

    def observe(self, step: int, record: dict) -> dict:
        c = self.cfg
        extra = self._target_metrics()
        measured = self._measure(record)
        if measured is None or not math.isfinite(measured):
            return extra
        a = c.controller_smoothing
        self.smoothed = measured if self.smoothed is None else a * measured + (1 - a) * self.smoothed
        # Logged beside nnz_target, in neurons per token when H is known.
        to_count = self.hidden_size if (c.target_nnz_fraction is not None and self.hidden_size) else 1
        extra["nnz_smoothed"] = self.smoothed * to_count
        if step < self.start_step:
            return extra
        if not self.active:
            # Hand-over: start from the schedule's current value so lambda is continuous.
            self.active = True
            self.log_lam = math.log(min(max(self.schedule.scheduled(step), c.l1_min), c.l1_max))
            self.prev_error = self._error()
        error = self._error()
        # Inside the deadband lambda holds. prev_error always tracks the raw error, so leaving
        # the band does not feed a spurious jump into the proportional term.
        if abs(error) >= c.controller_deadband:
            delta = c.controller_gain * error
            if c.controller == "pi":
                delta += c.controller_kp * (error - self.prev_error)
            delta = min(max(delta, -c.controller_max_step), c.controller_max_step)
            self.log_lam = min(max(self.log_lam + delta, math.log(c.l1_min)), math.log(c.l1_max))
        self.prev_error = error
        self.updates += 1
        return extra

    def _error(self) -> float:
        # Floor the measurement: a fully dead layer must give a large, finite error, not -inf.
        return math.log(max(self.smoothed, 1e-3 * self.target) / self.target)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"kind": "controller", "active": self.active, "log_lam": self.log_lam,
                "smoothed": self.smoothed, "prev_error": self.prev_error, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "controller":
            return  # resuming a scheduled run with a controller: start controlling from here
        self.active, self.log_lam = state["active"], state["log_lam"]
        self.smoothed, self.prev_error, self.updates = state["smoothed"], state["prev_error"], state["updates"]
