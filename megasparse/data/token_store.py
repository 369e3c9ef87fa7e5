"""Read-only token streams: one in memory, or several memory-mapped shard files end to end.

Both expose `num_tokens` and `read(start, length)`. Shards are opened lazily, in the process
that reads them, so a dataset pickled into DataLoader workers carries paths, not mapped pages.
"""
from __future__ import annotations

import numpy as np

from megasparse.errors import DataError


class InMemoryTokens:
    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def read(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start:start + length]


class ShardedTokens:
    """Shard files laid end to end.

    Every read checks that the ids are below vocab_size: a corrupt shard then fails with its
    file name instead of an index error deep inside the embedding. (File sizes are checked
    when the directory is opened, in `shards.open_preprocessed`.)
    """

    def __init__(self, files: list[str], counts: list[int], dtype: str, vocab_size: int):
        if len(files) != len(counts) or not files:
            raise DataError(f"a token split needs at least one shard and one count per shard, got {files}")
        self.files = list(files)
        self.counts = [int(c) for c in counts]
        self.dtype = np.dtype(dtype)
        self.vocab_size = int(vocab_size)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._maps: list[np.ndarray] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def _shards(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.memmap(f, dtype=self.dtype, mode="r", shape=(c,)) for f, c in zip(self.files, self.counts)]
        return self._maps

    def read(self, start: int, length: int) -> np.ndarray:
        shards = self._shards()
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, position, remaining = [], start, length
        for shard in range(first, len(shards)):
            if remaining <= 0:
                break
            offset = position - int(self.starts[shard])
            piece = shards[shard][offset:offset + remaining]
            if len(piece) and int(piece.max()) >= self.vocab_size:
                raise DataError(f"shard {self.files[shard]} is corrupt: token id {int(piece.max())} near offset "
                                f"{offset} is >= vocab_size {self.vocab_size}; re-run `megasparse data preprocess`")
            pieces.append(piece)
            position += len(piece)
            remaining -= len(piece)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None  # reopen in the receiving process
        return state
