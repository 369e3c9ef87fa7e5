"""TP-invariant initialisation: given a seed, the same full weights at any TP degree.

Each parameter gets its own CPU generator, seeded from (base seed, parameter name). The full
tensor is drawn from it, and a sharded parameter keeps only its slice. Because the draw depends
on neither the TP degree nor the order in which parameters are visited, tp=1 and tp=N models
built with the same seed hold identical full weights, and a rank never needs to talk to another
to initialise. Drawing on the CPU keeps the weights independent of the device as well; the cost
is one full-size temporary per parameter, as with Megatron's CPU initialisation.
"""
from __future__ import annotations

import zlib

import torch

from megasparse.parallel.sharding import shard_of


def parameter_seed(base_seed: int, name: str) -> int:
    """A stable 63-bit seed per parameter name (crc32 is the same in every process and run)."""
    return (int(base_seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


@torch.no_grad()
def seeded_normal_(param: torch.Tensor, name: str, std: float, base_seed: int) -> torch.Tensor:
    """Fill `param` (or its shard) with Normal(0, std) drawn for the full tensor."""
    shard = shard_of(param)
    full_shape = param.shape if shard is None else shard.full_shape(param.shape)
    gen = torch.Generator(device="cpu").manual_seed(parameter_seed(base_seed, name))
    full = torch.empty(full_shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    if shard is not None:
        full = full.narrow(shard.dim, shard.start, param.shape[shard.dim])
    param.copy_(full.to(dtype=param.dtype, device=param.device))
    return param
