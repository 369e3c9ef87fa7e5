"""Realistic synthetic sparse-FFN inputs, exactly as ../shared/BENCHMARKS.md prescribes.

Real sparse models fire about 29 of 5632 neurons per token, about 30% of neurons never fire,
and neuron popularity is log-normally skewed. We reproduce that without training a model:
input feature 0 is the constant 1, so column 0 of W_g acts as a per-neuron bias, and the bias
of neuron j is set to -Phi^-1(1 - p_j) * ||W_g[j, 1:]||. With x ~ N(0, 1) in the other
features, g_j = bias_j + N(0, ||W_g[j,1:]||^2), so neuron j fires with probability p_j.

Used by benchmarks and by GPU tests; tests on CPU use small shapes of the same generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FFNInputs:
    x: torch.Tensor        # [M, D]
    w_gate: torch.Tensor   # [H, D]   (nn.Linear layout: out_features x in_features)
    w_up: torch.Tensor     # [H, D]
    w_down: torch.Tensor   # [D, H]
    fire_prob: torch.Tensor  # [H] float32, the designed firing probability p_j


def firing_probabilities(hidden: int, target_nnz: float, dead_fraction: float = 0.3,
                         sigma: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """p_j: zero for a dead fraction, log-normal popularity for the rest, summing to target_nnz.

    Probabilities are clipped at 1; the clipped mass is redistributed so the sum still matches.
    """
    if not 0 <= dead_fraction < 1:
        raise ValueError(f"dead_fraction={dead_fraction} must be in [0, 1)")
    if not 0 < target_nnz < hidden * (1 - dead_fraction):
        raise ValueError(f"target_nnz={target_nnz} must be in (0, {hidden * (1 - dead_fraction):.0f}) "
                         f"for hidden={hidden} and dead_fraction={dead_fraction}")
    perm = torch.randperm(hidden, generator=generator)
    n_dead = int(round(dead_fraction * hidden))
    alive = perm[n_dead:]
    weights = torch.exp(sigma * torch.randn(alive.numel(), generator=generator, dtype=torch.float64))
    p_alive = weights / weights.sum() * target_nnz
    for _ in range(50):  # water-filling: clip at 1, rescale the rest
        over = p_alive > 1
        if not over.any():
            break
        p_alive[over] = 1.0
        free = ~over
        deficit = target_nnz - p_alive.sum()
        p_alive[free] += deficit * p_alive[free] / p_alive[free].sum()
    p = torch.zeros(hidden, dtype=torch.float64)
    p[alive] = p_alive
    return p.float()


def make_ffn_inputs(tokens: int, d_model: int, hidden: int, target_nnz: float = 29.0,
                    dead_fraction: float = 0.3, sigma: float = 1.0, dense_rows: int = 0,
                    dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    seed: int = 0) -> FFNInputs:
    """Build x, W_g, W_u, W_d whose relu(x W_g^T) has the BENCHMARKS.md sparsity statistics.

    ``dense_rows`` > 0 makes that many tokens fully dense (every neuron fires), to exercise
    overflow and dense-backup paths.
    """
    gen = torch.Generator().manual_seed(seed)
    scale = d_model ** -0.5
    w_gate = torch.randn(hidden, d_model, generator=gen) * scale
    w_up = torch.randn(hidden, d_model, generator=gen) * scale
    w_down = torch.randn(d_model, hidden, generator=gen) * hidden ** -0.5
    p = firing_probabilities(hidden, target_nnz, dead_fraction, sigma, gen)
    norm = w_gate[:, 1:].norm(dim=1)
    # -Phi^-1(1 - p) = Phi^-1(p); p = 0 gives -inf, replaced by a bias far below any activation.
    # p = 1 (water-filling clips there at high nnz on small H) would give +inf: an infinite gate,
    # inf/NaN outputs. Clamp to 1 - 1e-7 (a bias of ~5.2 sigma): fires on all but 1e-7 of tokens.
    bias = torch.special.ndtri(p.double().clamp(1e-30, 1.0 - 1e-7)).float() * norm
    bias[p == 0] = -30.0 * norm[p == 0]  # dead: never fires (30 standard deviations)
    w_gate[:, 0] = bias
    x = torch.randn(tokens, d_model, generator=gen)
    x[:, 0] = 1.0
    if dense_rows:
        # A (nearly) fully dense row: feature 0 = -4 flips every negative bias into a large
        # positive one, and small other features keep g_j ~ -4 * bias_j > 0. Neurons with
        # p_j >= 0.5 (bias >= 0) stay off; at nnz targets up to ~100 there are none.
        rows = torch.randperm(tokens, generator=gen)[:dense_rows]
        x[rows, 0] = -4.0
        x[rows, 1:] *= 0.01
    to = dict(dtype=dtype, device=device)
    return FFNInputs(x.to(**to), w_gate.to(**to), w_up.to(**to), w_down.to(**to), p.to(device))
