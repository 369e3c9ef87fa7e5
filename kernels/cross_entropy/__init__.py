"""Fused softmax cross-entropy over (possibly vocabulary-sharded) logits, in two Triton passes.

For logits z [N, V_local] (this rank's contiguous slice [vocab_start, vocab_start + V_local) of
the vocabulary; the whole vocabulary when vocab_start = 0 and there is one rank) and labels [N]
holding GLOBAL token ids:

    row_stats:  row_max[n] = max_v z[n, v]
                sum_exp[n] = sum_v exp(z[n, v] - row_max[n])
                target[n]  = z[n, label[n] - vocab_start] if this slice owns label[n], else 0
                             (and 0 for label[n] == ignore_index)
    combine:    M = max_r row_max_r,  S = sum_r sum_exp_r * exp(row_max_r - M),  T = sum_r target_r
                lse = M + log(S),     loss = lse - T            (tp=1: lse = row_max + log(sum_exp))
    grad:       dz[n, v] = scale[n] * (exp(z[n, v] - lse[n]) - [v == label[n] - vocab_start])
                (0 on rows whose label is ignore_index, whatever their scale)

Precision: the losses are formed as (M - T) + log(S), and the backward (given shift = M and
lse = log(S)) takes exp((z - M) - log(S)); both are then as exact as torch's log_softmax for
any logit magnitude. With a single fp32 lse = M + log(S), the rounding of lse (half an ulp of
M: ~5e-4 at |z| ~ 1e4, ~1 beyond 1.7e7) would go straight into the loss and into every
probability.

row_stats reads the logits once (an online max / sum-exp over vocabulary blocks, in fp32) and
writes three fp32 numbers per row; grad reads them once more and writes the gradient once in
the logits' dtype, optionally over the logits themselves. torch's F.cross_entropy(z.float())
instead writes an fp32 copy, an fp32 log-softmax (kept for the backward) and a dense fp32
gradient, and casts it back: about five times the memory traffic, plus an [N, V] fp32 tensor
alive between forward and backward. See README.md.

The pure-torch references (`row_stats_reference`, `grad_reference`) are the definition and the
CPU path. `row_stats` and `grad_logits` dispatch: the Triton kernels (kernel.py) on CUDA, or on
CPU under TRITON_INTERPRET=1 (tests); the references otherwise, and always for fp64 logits
(which the kernels do not take; the references then compute in fp64). Triton is imported only
when a kernel runs, so CPU installs need none.

Labels outside [0, V) other than ignore_index are not checked (that would cost a host sync per
call): they own no column, so their target is 0 and their gradient has no -1 term.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from ..interpreter import interpreting

__all__ = [
    "IGNORE_INDEX", "KERNEL_DTYPES", "row_stats", "row_stats_reference", "grad_logits", "grad_reference",
    "lse_from_row_stats", "combine_row_stats", "CrossEntropy", "cross_entropy",
]

IGNORE_INDEX = -100
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# the references also take fp64 (kept in fp64, for exact tests such as tests/parallel's)
_DTYPES = KERNEL_DTYPES + (torch.float64,)

Stats = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _use_kernel(logits: torch.Tensor) -> bool:
    return logits.dtype in KERNEL_DTYPES and (logits.is_cuda or (interpreting() and logits.device.type == "cpu"))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------
# input checks (shared by the references, the dispatchers and the kernel launchers)
# ----------------------------------------------------------------------------------------------
def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, op: str,
                         dtypes: Sequence[torch.dtype] = _DTYPES) -> torch.Tensor:
    """Raise a clear error on bad input; return the labels as a contiguous int64 [N] tensor."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"cross_entropy {op}: logits and labels must be tensors, got "
                        f"{type(logits).__name__} and {type(labels).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy {op}: logits have shape {list(logits.shape)}; expected 2 dims "
                         f"[N tokens, V_local vocabulary] (flatten leading dims first)")
    if logits.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"cross_entropy {op}: unsupported logits dtype {logits.dtype}; expected one of {names}")
    if logits.shape[1] == 0:
        raise ValueError(f"cross_entropy {op}: logits have an empty vocabulary dimension (shape {list(logits.shape)})")
    if logits.shape[1] > 1 and logits.stride(-1) != 1:
        raise ValueError(f"cross_entropy {op}: logits rows are not contiguous (stride {logits.stride()}, need "
                         f"stride(-1) == 1); call .contiguous() first")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"cross_entropy {op}: labels must be an integer tensor (int64 token ids), got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"cross_entropy {op}: labels have shape {list(labels.shape)}; expected 1 dim [N]")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"cross_entropy {op}: logits have N={logits.shape[0]} rows but labels have "
                         f"{labels.shape[0]} entries")
    if labels.device != logits.device:
        raise ValueError(f"cross_entropy {op}: labels are on {labels.device} but logits on {logits.device}")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"cross_entropy {op}: vocab_start must be a non-negative int (the first global id "
                         f"of this vocabulary slice), got {vocab_start!r}")
    return labels.to(torch.int64).contiguous()


def _check_row_vector(t: torch.Tensor, name: str, n: int, device: torch.device, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"cross_entropy {op}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"cross_entropy {op}: {name} must be a float tensor (fp32), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"cross_entropy {op}: {name} has shape {list(t.shape)}; expected [N={n}]")
    if t.device != device:
        raise ValueError(f"cross_entropy {op}: {name} is on {t.device} but logits on {device}")


def _check_grad_inputs(logits, labels, lse, scale, vocab_start, out, shift, op, dtypes=_DTYPES) -> torch.Tensor:
    labels = _check_logits_labels(logits, labels, vocab_start, op, dtypes)
    n = logits.shape[0]
    _check_row_vector(lse, "lse", n, logits.device, op)
    _check_row_vector(scale, "scale", n, logits.device, op)
    if shift is not None:
        _check_row_vector(shift, "shift", n, logits.device, op)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"cross_entropy {op}: out must be a tensor, got {type(out).__name__}")
        if out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device:
            raise ValueError(f"cross_entropy {op}: out is {out.dtype} {list(out.shape)} on {out.device}; expected "
                             f"{logits.dtype} {list(logits.shape)} on {logits.device} (the logits' own)")
        if out.shape[1] > 1 and out.stride(-1) != 1:
            raise ValueError(f"cross_entropy {op}: out rows are not contiguous (stride {out.stride()}, need "
                             f"stride(-1) == 1)")
    return labels


# ----------------------------------------------------------------------------------------------
# pure-torch references (the definition, and the CPU path)
# ----------------------------------------------------------------------------------------------
def row_stats_reference(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int = 0,
                        ignore_index: int = IGNORE_INDEX) -> Stats:
    """(row_max, sum_exp, target), each [N], from logits [N, V_local] and global labels [N].

    Computed in fp32 (fp64 for fp64 logits). A row that is all -inf gives row_max -inf and
    sum_exp 0, as the kernel does."""
    labels = _check_logits_labels(logits, labels, vocab_start, "row_stats_reference")
    z = logits.to(_compute_dtype(logits.dtype))
    row_max = z.max(dim=-1).values
    shift = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    sum_exp = torch.exp(z - shift[:, None]).sum(dim=-1)
    local = labels - vocab_start
    owned = (labels != ignore_index) & (local >= 0) & (local < z.shape[1])
    target = z.gather(1, local.masked_fill(~owned, 0)[:, None])[:, 0]
    target = torch.where(owned, target, torch.zeros_like(target))
    return row_max, sum_exp, target


def grad_reference(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                   vocab_start: int = 0, ignore_index: int = IGNORE_INDEX,
                   out: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """scale[n] * (softmax(z)[n, v] - onehot(label[n] - vocab_start)[v]) in the logits' dtype,
    with lse [N] the GLOBAL log-sum-exp of each row (relative to `shift` when that is given:
    softmax = exp((z - shift) - lse)); rows labelled ignore_index get 0. Written into `out` when
    given (which may be `logits` itself), else into a new tensor."""
    labels = _check_grad_inputs(logits, labels, lse, scale, vocab_start, out, shift, "grad_reference")
    cdt = _compute_dtype(logits.dtype)
    z = logits.to(cdt)
    keep = labels != ignore_index
    s = torch.where(keep, scale.to(cdt), torch.zeros((), dtype=cdt, device=z.device))
    if shift is not None:
        z = z - shift.to(cdt)[:, None]
    g = torch.exp(z - lse.to(cdt)[:, None])
    local = labels - vocab_start
    owned = keep & (local >= 0) & (local < z.shape[1])
    rows = torch.arange(z.shape[0], device=z.device)[owned]
    g[rows, local[owned]] -= 1
    g = torch.where(keep[:, None], g * s[:, None], torch.zeros((), dtype=cdt, device=z.device))
    if out is None:
        return g.to(logits.dtype)
    return out.copy_(g)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def row_stats(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int = 0,
              ignore_index: int = IGNORE_INDEX) -> Stats:
    """(row_max, sum_exp, target) [N] fp32 (see the module doc): the Triton kernel on CUDA or
    under TRITON_INTERPRET=1, `row_stats_reference` otherwise (and for fp64 logits)."""
    if _use_kernel(logits):
        from .kernel import row_stats_triton
        return row_stats_triton(logits, labels, vocab_start, ignore_index)
    return row_stats_reference(logits, labels, vocab_start, ignore_index)


def grad_logits(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                vocab_start: int = 0, ignore_index: int = IGNORE_INDEX,
                out: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient of sum_n scale[n] * loss[n] w.r.t. logits [N, V_local], in the logits' dtype.

    lse: [N] the global log-sum-exp (after combining ranks); scale: [N] the incoming gradient of
    each row's loss. out: where to write it (default a new tensor); passing `logits` itself
    overwrites the logits with their gradient, so that no new [N, V] buffer is allocated; only
    do that when nothing else reads those logits afterwards. shift: optional [N]; when given,
    lse is taken relative to it (pass shift = the global max M and lse = log(S)), which keeps
    full precision for logits of any magnitude (see the module doc)."""
    if _use_kernel(logits):
        from .kernel import grad_triton
        return grad_triton(logits, labels, lse, scale, vocab_start, ignore_index, out=out, shift=shift)
    return grad_reference(logits, labels, lse, scale, vocab_start, ignore_index, out=out, shift=shift)


# ----------------------------------------------------------------------------------------------
# combining the per-row statistics
# ----------------------------------------------------------------------------------------------
def lse_from_row_stats(row_max: torch.Tensor, sum_exp: torch.Tensor) -> torch.Tensor:
    """log(sum_v exp(z_v)) of each row, from one rank's (tp=1: the whole vocabulary's) stats."""
    return row_max + torch.log(sum_exp)


def combine_row_stats(row_max: Union[torch.Tensor, Sequence[torch.Tensor]],
                      sum_exp: Union[torch.Tensor, Sequence[torch.Tensor]],
                      target: Union[torch.Tensor, Sequence[torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lse, target) [N] of full rows from the stats of R vocabulary shards ([R, N] tensors, or
    sequences of R [N] tensors): what a MAX all-reduce of row_max followed by a SUM all-reduce of
    (sum_exp * exp(row_max - M), target) computes across ranks. R = 1 is lse_from_row_stats."""
    row_max, sum_exp, target = (torch.stack(list(t)) if not isinstance(t, torch.Tensor) else t
                                for t in (row_max, sum_exp, target))
    m = row_max.max(dim=0).values
    shift = torch.where(m == float("-inf"), torch.zeros_like(m), m)   # rows of -inf on every shard
    s = (sum_exp * torch.exp(row_max - shift)).sum(dim=0)
    return shift + torch.log(s), target.sum(dim=0)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class CrossEntropy(torch.autograd.Function):
    """Per-token losses [N] (fp32; fp64 for fp64 logits) from logits [N, V] and labels [N]
    (one rank, the whole vocabulary). Rows labelled ignore_index get loss 0 and gradient 0.

        CrossEntropy.apply(logits, labels, ignore_index=-100, inplace_backward=False)

    Saved for the backward: logits (alive in the caller's graph anyway), labels, and lse as two
    [N] fp32 halves (row_max, log(sum_exp)), never an [N, V] fp32 tensor. inplace_backward=True writes the gradient over the saved logits
    (no [N, V] allocation in the backward); that is only safe when nothing else reads those
    logits after this backward (e.g. they are the lm_head's matmul output, used by this loss
    alone), so it is off by default and refused for leaf tensors. Autograd nodes that saved the
    same logits and run their backward afterwards then raise (the version counter is bumped)."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index=IGNORE_INDEX, inplace_backward=False):
        base = logits if logits._base is None else logits._base   # cross_entropy's reshape is a view
        if inplace_backward and base.is_leaf and base.requires_grad:
            raise ValueError("cross_entropy: inplace_backward=True would overwrite a leaf tensor (and alias its "
                             ".grad to it); use it only on intermediate logits that nothing else reads")
        row_max, sum_exp, target = row_stats(logits, labels, 0, ignore_index)
        log_sum_exp = torch.log(sum_exp)       # lse = row_max + log_sum_exp, kept in two parts
        loss = ((row_max - target) + log_sum_exp).masked_fill_(labels == ignore_index, 0.0)
        ctx.save_for_backward(logits, labels, row_max, log_sum_exp)
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, row_max, log_sum_exp = ctx.saved_tensors
        out = logits if ctx.inplace_backward else None
        # grad_logits writes exactly 0 on ignored rows, even where grad_loss is inf/nan (the
        # gradient of a mean over zero tokens), so grad_loss goes in unmasked
        grad = grad_logits(logits, labels, log_sum_exp, grad_loss, 0, ctx.ignore_index, out=out, shift=row_max)
        if ctx.inplace_backward:
            # the logits now hold their gradient: any other node that saved them (and has not run
            # its backward yet) raises autograd's "modified by an inplace operation" error instead
            # of reading the gradient as logits; so does a second backward through this one
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  inplace_backward: bool = False) -> torch.Tensor:
    """F.cross_entropy(logits.float(), labels) with reduction='mean': the mean over tokens whose
    label is not ignore_index (nan when there are none, with a zero gradient), for logits
    [..., V] (vocabulary LAST, unlike F.cross_entropy's class dim 1) and labels [...]."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"cross_entropy: logits and labels must be tensors, got {type(logits).__name__} and "
                        f"{type(labels).__name__}")
    if logits.dim() < 1 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"cross_entropy: logits have shape {list(logits.shape)} and labels {list(labels.shape)}; "
                         f"expected logits [..., V] and labels [...] with the same leading dims")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    per_token = CrossEntropy.apply(flat_logits, flat_labels, ignore_index, inplace_backward)
    return per_token.sum() / (flat_labels != ignore_index).sum()
