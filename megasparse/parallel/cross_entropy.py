"""Cross-entropy over vocabulary-sharded logits, without ever gathering full-vocab logits.

Each TP rank holds logits for its contiguous slice of the vocabulary, [N, V/t]. Per token:
    loss = log(sum_v exp(z_v - M)) - (z_target - M),    M = max_v z_v
kernels/cross_entropy gives each rank's per-row max, sum of exponentials and target logit (the
target is owned by exactly one rank); one MAX all-reduce of [N] and one SUM all-reduce of [2, N]
combine them. The backward is local: softmax_local - onehot_local(target), scaled by the incoming
gradient, recomputed from the saved logits (alive in the caller's graph anyway), so nothing of
[N, V/t] in fp32 is kept. On CUDA the two passes are Triton kernels; elsewhere (CPU, fp64) their
torch references, so a CPU tensor-parallel run never goes through the Triton interpreter.
"""
from __future__ import annotations

import torch

from kernels.cross_entropy import KERNEL_DTYPES, grad_logits, grad_reference, row_stats, row_stats_reference
from megasparse.parallel.mappings import all_reduce_, all_reduce_max_


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token losses [N] from local logits [N, V_local]; labels hold global vocab ids."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group):
        stats, ctx.grad = (row_stats, grad_logits) if _fused_wanted(logits) else (row_stats_reference, grad_reference)
        # ignore_index labels (-100) own no column, so -1 (no label is) makes the passes treat
        # every row alike: the caller's mean gives ignored rows a zero grad_loss
        row_max, sum_exp, target = stats(logits, labels, vocab_start, ignore_index=-1)
        shift = row_max.clone()
        all_reduce_max_(shift, group)
        sums = torch.stack([sum_exp * torch.exp(row_max - shift), target])
        all_reduce_(sums, group)
        log_sum_exp = torch.log(sums[0])
        ctx.save_for_backward(logits, labels, shift, log_sum_exp)
        ctx.vocab_start = vocab_start
        return (shift - sums[1]) + log_sum_exp

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, shift, log_sum_exp = ctx.saved_tensors
        grad = ctx.grad(logits, labels, log_sum_exp, grad_loss, ctx.vocab_start, -1, shift=shift)
        return grad, None, None, None


def _fused_wanted(logits: torch.Tensor) -> bool:
    """The Triton passes on CUDA (bf16/fp16/fp32); the torch references on CPU and for fp64."""
    return logits.is_cuda and logits.dtype in KERNEL_DTYPES


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean CE over tokens whose label is not `ignore_index` (F.cross_entropy's convention).

    logits: [..., V_local] this rank's vocabulary slice; labels: [...] global token ids.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    per_token = VocabParallelCrossEntropy.apply(flat_logits, flat_labels, vocab_start, group)
    valid = flat_labels != ignore_index
    # Like F.cross_entropy: mean over the valid tokens (nan if there are none).
    return (per_token * valid).sum() / valid.sum()
