"""The global sample order and each data-parallel rank's share of it.

The order is an infinite stream: epoch e is a permutation of all samples drawn from
(seed, e), and epochs follow each other without a gap (a global batch may straddle two
epochs). Global batch b is stream positions [b*G, (b+1)*G); DP rank r takes the contiguous
slice [r*G/n, (r+1)*G/n) of it. Nothing depends on the DP degree but the slicing, so changing
it keeps the order, and the whole state is `consumed_samples`: resume is exact.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from megasparse.errors import ConfigError, DataError


class GlobalBatchSampler:
    """Yields this rank's indices of each global batch, forever; a batch sampler for DataLoader.

    `consumed_samples` advances by global_batch_size when a batch is handed out. A DataLoader
    with workers prefetches, so it draws batches ahead of training: checkpoint the number of
    samples the training loop actually consumed (steps x global batch), not this attribute.
    """

    def __init__(self, num_samples: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, consumed_samples: int = 0):
        if num_samples < 1:
            raise DataError(f"num_samples={num_samples}: the dataset is empty")
        if global_batch_size < 1 or dp_size < 1 or global_batch_size % dp_size:
            raise ConfigError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                              f"data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if seed < 0:
            raise ConfigError(f"seed={seed} must be >= 0 (numpy seeds are non-negative); set train.seed")
        if consumed_samples < 0:
            raise ConfigError(f"consumed_samples={consumed_samples} must be >= 0")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed = int(seed)
        self.consumed_samples = int(consumed_samples)
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.dp_size

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])  # a fresh, independent stream per epoch
            self._cached_epoch = (epoch, rng.permutation(self.num_samples))
        return self._cached_epoch[1]

    def stream(self, start: int, count: int) -> list[int]:
        """Sample indices at global stream positions [start, start + count)."""
        out: list[int] = []
        position, end = start, start + count
        while position < end:
            epoch, offset = divmod(position, self.num_samples)
            take = min(end - position, self.num_samples - offset)
            out.extend(self.epoch_permutation(epoch)[offset:offset + take].tolist())
            position += take
        return out

    def global_batch(self, consumed_samples: int) -> list[int]:
        """The whole global batch that starts at consumed_samples (all ranks)."""
        return self.stream(consumed_samples, self.global_batch_size)

    def local_batch(self, consumed_samples: int) -> list[int]:
        """This rank's slice of the global batch that starts at consumed_samples."""
        local = self.local_batch_size
        return self.stream(consumed_samples + self.dp_rank * local, local)

    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batch = self.local_batch(self.consumed_samples)
            self.consumed_samples += self.global_batch_size
            yield batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
