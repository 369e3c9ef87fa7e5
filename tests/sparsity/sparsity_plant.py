"""A synthetic stand-in for training: nnz/token responds to lambda with a power law, a lag and noise.

Equilibrium nnz(lambda) = H * dense_frac / (1 + (lambda / lam_half) ** power): dense for small
lambda, falling as a power law for large lambda (the shape measured on the demo model). The
model approaches equilibrium with a first-order lag of ``tau`` steps, and each log interval's
measurement carries multiplicative noise.
"""
import math
import random


class Plant:
    def __init__(self, hidden=704, dense_frac=0.3, lam_half=0.01, power=1.5, tau=15.0, noise=0.05, seed=0):
        self.hidden, self.dense_frac, self.lam_half, self.power = hidden, dense_frac, lam_half, power
        self.tau, self.noise = tau, noise
        self.nnz = hidden * dense_frac
        self.rng = random.Random(seed)

    def equilibrium(self, lam: float) -> float:
        return self.hidden * self.dense_frac / (1.0 + (lam / self.lam_half) ** self.power)

    def step(self, lam: float) -> None:
        self.nnz += (self.equilibrium(lam) - self.nnz) / self.tau

    def measure(self) -> float:
        return self.nnz * math.exp(self.rng.gauss(0.0, self.noise))


def run(schedule, plant: Plant, steps: int, log_interval: int = 10):
    """Drive a schedule/controller like the trainer does; return [(step, lambda, true nnz)]."""
    history = []
    for step in range(steps):
        plant.step(schedule.coeff(step))
        if (step + 1) % log_interval == 0:
            m = plant.measure()
            schedule.observe(step + 1, {"nnz_per_token": m, "nnz_fraction_layer": [m / plant.hidden] * 4})
            history.append((step + 1, schedule.coeff(step + 1), plant.nnz))
    return history
