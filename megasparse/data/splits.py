"""Deterministic train/valid split by document.

The split seed is a constant, not the training seed: the validation set must stay the same
across runs with different seeds, or their validation losses are not comparable.
"""
from __future__ import annotations

import numpy as np

from megasparse.errors import DataError

SPLIT_SEED = 20240601


def split_document_indices(num_documents: int, valid_fraction: float,
                           seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) document indices, each sorted (documents keep their original order).

    valid gets round(num_documents * valid_fraction) documents, at least one, and train keeps
    at least one.
    """
    if num_documents < 2:
        raise DataError(f"need at least 2 documents to split train/valid by document, got {num_documents}; "
                        f"add text or split it into more documents")
    if not 0 < valid_fraction < 1:
        raise DataError(f"valid_fraction={valid_fraction} must be in (0, 1)")
    num_valid = min(max(1, round(num_documents * valid_fraction)), num_documents - 1)
    order = np.random.default_rng(seed).permutation(num_documents)
    return np.sort(order[num_valid:]), np.sort(order[:num_valid])
