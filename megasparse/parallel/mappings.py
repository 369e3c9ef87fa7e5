"""Every tensor-parallel collective, each a named autograd.Function (Megatron semantics).

A "region" is the span of the network in which each TP rank holds only its shard of a
dimension (heads, FFN neurons, vocabulary). Four mappings move tensors in and out of it; each
one's backward is the forward's adjoint:

    copy_to_region       forward: identity          backward: all-reduce (sum)
    reduce_from_region   forward: all-reduce (sum)  backward: identity
    scatter_to_region    forward: keep my chunk     backward: all-gather
    gather_from_region   forward: all-gather        backward: keep my chunk

(scatter/gather act on the last dimension.) Every function takes the process group; ``None``
means this rank's TP group. On a group of one rank each mapping is the identity and issues no
collective, so the tp=1 code path is the plain one.

The non-differentiable helpers at the bottom (`all_reduce_`, `all_reduce_max_`) exist so the
vocab-parallel cross-entropy can keep its collectives in this file too.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _group(group):
    if group is not None:
        return group
    from megasparse.parallel.state import get_parallel_state

    return get_parallel_state().tp_group


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _world(group) == 1:
        return x
    # Never reduce in place: the input may be saved for someone else's backward.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    if x.shape[-1] % world:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the group size {world}")
    # contiguous(): a view into the full tensor would keep it alive and confuse later in-place ops.
    return x.chunk(world, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class CopyToRegion(torch.autograd.Function):
    """Enter the region: every rank uses the full input; the input's gradient sums the ranks'."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class ReduceFromRegion(torch.autograd.Function):
    """Leave the region: sum the ranks' partial results; each rank's part gets the full gradient."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ScatterToRegion(torch.autograd.Function):
    """Keep this rank's chunk of the last dimension; the gradient is gathered back to full."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class GatherFromRegion(torch.autograd.Function):
    """Concatenate the ranks' chunks of the last dimension; the gradient keeps this rank's chunk."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_region(x: torch.Tensor, group=None) -> torch.Tensor:
    group = _group(group)
    return x if _world(group) == 1 else CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group=None) -> torch.Tensor:
    group = _group(group)
    return x if _world(group) == 1 else ReduceFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group=None) -> torch.Tensor:
    group = _group(group)
    return x if _world(group) == 1 else ScatterToRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group=None) -> torch.Tensor:
    group = _group(group)
    return x if _world(group) == 1 else GatherFromRegion.apply(x, group)


# ------------------------------------------------------------ non-differentiable helpers

def all_reduce_(x: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over the group, for use inside another autograd.Function's forward."""
    group = _group(group)
    if _world(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def all_reduce_max_(x: torch.Tensor, group=None) -> torch.Tensor:
    group = _group(group)
    if _world(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def broadcast_(x: torch.Tensor, src_rank_in_group: int = 0, group=None) -> torch.Tensor:
    """Broadcast from the group's src-th member (used to agree on one initialisation seed)."""
    group = _group(group)
    if _world(group) > 1:
        dist.broadcast(x, src=dist.get_global_rank(group, src_rank_in_group), group=group)
    return x
