"""Fixed-length training samples cut from one token stream.

Sample i is tokens[i*seq_len : i*seq_len + seq_len + 1]: inputs are s[:-1], labels s[1:], and
consecutive samples share one token so that every token is predicted exactly once. Sequences
run across document boundaries (documents are separated by EOS); there is no cross-document
attention masking. The trailing tokens that do not fill a whole sample are dropped.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from megasparse.errors import DataError


class PackedSequenceDataset(Dataset):
    def __init__(self, tokens, seq_len: int, name: str):
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self.name = name
        self.num_samples = (tokens.num_tokens - 1) // self.seq_len
        if self.num_samples < 1:
            raise DataError(f"the {name} split has {tokens.num_tokens} tokens, fewer than one sample of "
                            f"data.seq_len + 1 = {self.seq_len + 1}; lower data.seq_len or add data")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> torch.Tensor:
        index = int(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is out of range for the {self.name} split of {self.num_samples} samples")
        window = self.tokens.read(index * self.seq_len, self.seq_len + 1)
        return torch.from_numpy(window.astype(np.int64))

    def __repr__(self) -> str:
        return (f"PackedSequenceDataset({self.name}: {self.num_samples} samples of {self.seq_len}+1 tokens, "
                f"{self.tokens.num_tokens} tokens)")
