"""The open log interval: what the trainer has summed since its last log line.

A log line averages the loss terms over every step of its interval, so a checkpoint taken in
the middle of an interval must carry the sums so far, or the first line after a resume would
average only the steps run since. The sums are per DP rank (the log line all-reduces them), so a
save keeps two forms:
- `state()`, this rank's own sums, in a per-rank file: a resume at the same layout restores each
  rank's exactly, so the log line is bit-identical to the uninterrupted run's;
- `reduced_state(dp_group)`, the DP sums (a collective), in the client state: a resume at
  another DP degree gives them to DP rank 0 and zeros to the others.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def _zero(device) -> torch.Tensor:
    return torch.zeros((), device=device)


@dataclass
class StepTotals:
    """Sums over a log interval, kept on the device so that logging is the only sync.
    `steps` and `seconds` (training time so far, eval and saves excluded) give tokens/s."""
    device: torch.device
    loss: torch.Tensor = None
    ce: torch.Tensor = None
    aux: torch.Tensor = None
    micro_batches: int = 0
    skipped: int = 0            # agreed by every rank, so the same on each
    steps: int = 0
    seconds: float = 0.0

    def __post_init__(self):
        for name in ("loss", "ce", "aux"):
            if getattr(self, name) is None:
                setattr(self, name, _zero(self.device))

    def state(self) -> dict:
        return {"loss": self.loss.item(), "ce": self.ce.item(), "aux": self.aux.item(),
                "micro_batches": self.micro_batches, "skipped": self.skipped, "steps": self.steps,
                "seconds": self.seconds}

    def reduced_state(self, dp_group) -> dict:
        """The DP sums of the loss terms (a collective over dp_group)."""
        sums = torch.stack([self.loss, self.ce, self.aux,
                            torch.tensor(float(self.micro_batches), device=self.loss.device)])
        if dist.is_initialized():
            dist.all_reduce(sums, group=dp_group)
        loss, ce, aux, n = sums.tolist()
        return {**self.state(), "loss": loss, "ce": ce, "aux": aux, "micro_batches": int(n)}

    @classmethod
    def restored(cls, device, state: dict | None, holds_sums: bool = True) -> StepTotals:
        """From state() or reduced_state(); without holds_sums only the rank-independent parts
        (steps, seconds, skipped) are kept, and the sums start from zero."""
        if not state:
            return cls(device)
        t = torch.tensor  # float32 on the device, as the sums are kept
        sums = dict(loss=t(state["loss"], device=device), ce=t(state["ce"], device=device),
                    aux=t(state["aux"], device=device), micro_batches=state["micro_batches"]) if holds_sums else {}
        return cls(device, skipped=state["skipped"], steps=state["steps"], seconds=state["seconds"], **sums)
