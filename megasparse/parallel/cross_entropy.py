"""Cross-entropy over vocabulary-sharded logits, without ever gathering full-vocab logits.

Each TP rank holds logits for its contiguous slice of the vocabulary, [N, V/t]. Per token:
    loss = log(sum_v exp(z_v - m)) - (z_target - m),    m = max_v z_v
The max, the target logit (which exactly one rank owns) and the sum of exponentials are the
only cross-rank quantities: one MAX all-reduce of [N] and one SUM all-reduce of [2, N]. The
backward is local: softmax_local - onehot_local(target), scaled by the incoming gradient.
Memory is that of the local softmax, [N, V/t] fp32, as in Megatron.
"""
from __future__ import annotations

import torch

from kernels.cross_entropy import KERNEL_DTYPES, grad_logits, row_stats
from megasparse.parallel.mappings import all_reduce_, all_reduce_max_


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token losses [N] from local logits [N, V_local]; labels hold global vocab ids."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group):
        ctx.fused = _fused_wanted(logits)
        if ctx.fused:
            return _fused_forward(ctx, logits, labels, vocab_start, group)
        ctx.input_dtype = logits.dtype
        # At least fp32 (bf16 log-sum-exp is too coarse); fp64 stays fp64 for exact tests.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        local_vocab = logits.shape[-1]
        row_max = logits.max(dim=-1).values  # no gradient flows through the shift
        all_reduce_max_(row_max, group)
        shifted = logits - row_max.unsqueeze(-1)

        # Labels outside [vocab_start, vocab_start + V_local) belong to another rank (or are the
        # ignore index); they pick a dummy column here and contribute zero.
        owned = (labels >= vocab_start) & (labels < vocab_start + local_vocab)
        local_labels = (labels - vocab_start).masked_fill(~owned, 0)
        target = shifted.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1) * owned

        exp = shifted.exp_()  # reuse the buffer: shifted is not needed again
        sums = torch.stack([exp.sum(dim=-1), target])
        all_reduce_(sums, group)
        sum_exp, target = sums[0], sums[1]
        loss = torch.log(sum_exp) - target

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_labels, owned)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.fused:
            logits, labels, shift, log_sum_exp = ctx.saved_tensors
            # ignore_index labels own no column, and the caller's mean gives their rows a zero
            # grad_loss, so the kernel's own ignore handling is not needed here (-1: no label is)
            grad = grad_logits(logits, labels, log_sum_exp, grad_loss, ctx.vocab_start, -1, shift=shift)
            return grad, None, None, None
        softmax, local_labels, owned = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_labels] -= owned.to(grad.dtype)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def _fused_wanted(logits: torch.Tensor) -> bool:
    """The Triton passes on CUDA (bf16/fp16/fp32); the torch form on CPU and for fp64."""
    return logits.is_cuda and logits.dtype in KERNEL_DTYPES


def _fused_forward(ctx, logits, labels, vocab_start, group):
    """The same losses from kernels/cross_entropy's two Triton passes (CUDA): per-row max,
    sum of exponentials and target logit of this rank's slice, combined across ranks by the same
    two all-reduces; the backward recomputes the softmax from the saved bf16 logits instead of
    keeping an [N, V_local] fp32 one."""
    row_max, sum_exp, target = row_stats(logits, labels, vocab_start, ignore_index=-1)
    shift = row_max.clone()
    all_reduce_max_(shift, group)
    sums = torch.stack([sum_exp * torch.exp(row_max - shift), target])
    all_reduce_(sums, group)
    log_sum_exp = torch.log(sums[0])
    ctx.save_for_backward(logits, labels, shift, log_sum_exp)
    ctx.vocab_start = vocab_start
    return (shift - sums[1]) + log_sum_exp


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
