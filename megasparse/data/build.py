"""`build_data`: the one call the trainer makes to get its tokenizer and datasets.

data.path unset: the bundled Shakespeare plays, tokenized with data.tokenizer or the cached demo
tokenizer (the encodings are cached too), held in memory, and split by play with
data.valid_fraction.
data.path set: a `megasparse data preprocess` directory; its split is fixed at preprocessing.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from megasparse.data.bundled import bundled_text_sha256, read_bundled_documents
from megasparse.data.packed import PackedSequenceDataset
from megasparse.data.sampler import GlobalBatchSampler
from megasparse.data.shards import content_hash, open_preprocessed, token_dtype, verify_checksums
from megasparse.data.splits import SPLIT_SEED, split_document_indices
from megasparse.data.token_store import InMemoryTokens
from megasparse.data.tokenizer import Tokenizer, cache_dir, demo_tokenizer
from megasparse.errors import DataError


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: PackedSequenceDataset
    valid: PackedSequenceDataset
    tokenizer_hash: str      # sha256 of the tokenizer .model file
    data_hash: str           # identifies the token streams and their cut into samples (incl. seq_len)
    seed: int
    description: str

    def sampler(self, global_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                split: str = "train") -> GlobalBatchSampler:
        dataset = self.train if split == "train" else self.valid
        return GlobalBatchSampler(num_samples=len(dataset), global_batch_size=global_batch_size,
                                  dp_rank=dp_rank, dp_size=dp_size, seed=self.seed,
                                  consumed_samples=consumed_samples)

    def check_resume(self, tokenizer_hash: str | None, data_hash: str | None, where: str) -> None:
        """Raise if a checkpoint (where) was trained with another tokenizer or other data."""
        if tokenizer_hash is not None and tokenizer_hash != self.tokenizer_hash:
            raise DataError(f"{where} was trained with tokenizer sha256 {tokenizer_hash[:12]}..., but this run's "
                            f"tokenizer {self.tokenizer.path} has sha256 {self.tokenizer_hash[:12]}...; "
                            f"set data.tokenizer (and data.path) to the ones the checkpoint used")
        if data_hash is not None and data_hash != self.data_hash:
            raise DataError(f"{where} was trained on data with hash {data_hash[:12]}..., but this run's data "
                            f"has hash {self.data_hash[:12]}... ({self.description}); resuming would not "
                            f"continue the same sample order: use the same data.path, data.seq_len and "
                            f"data.valid_fraction")


def _check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    if tokenizer.vocab_size != vocab_size:
        raise DataError(f"tokenizer {tokenizer.path} has vocab size {tokenizer.vocab_size} but "
                        f"model.vocab_size={vocab_size}; set model.vocab_size={tokenizer.vocab_size} "
                        f"or use a tokenizer with {vocab_size} pieces")


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _join_documents(token_lists: list, eos_id: int, dtype: np.dtype) -> np.ndarray:
    lengths = [len(t) + 1 for t in token_lists]
    out = np.empty(sum(lengths), dtype=dtype)
    position = 0
    for tokens, length in zip(token_lists, lengths):
        out[position:position + length - 1] = tokens
        out[position + length - 1] = eos_id
        position += length
    return out


def _encode_bundled(documents, tokenizer: Tokenizer) -> list[np.ndarray]:
    """The plays' encodings, cached by (text, tokenizer): encoding 2 MB costs every rank ~2 s."""
    key = f"{bundled_text_sha256()[:16]}-{tokenizer.sha256[:16]}"
    path = os.path.join(cache_dir(), "bundled-tokens", f"{key}.npz")
    if os.path.isfile(path):
        with np.load(path) as cached:
            return np.split(cached["tokens"], np.cumsum(cached["lengths"])[:-1])
    encoded = tokenizer.encode_batch([doc.text for doc in documents])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, tokens=np.concatenate([np.asarray(e, dtype=np.int32) for e in encoded]),
             lengths=np.asarray([len(e) for e in encoded], dtype=np.int64))
    os.replace(tmp, path)  # atomic: concurrent ranks write identical content
    return [np.asarray(e, dtype=np.int32) for e in encoded]


def _build_bundled(data_cfg, vocab_size: int, seed: int) -> DataBundle:
    tokenizer = Tokenizer(data_cfg.tokenizer) if data_cfg.tokenizer else demo_tokenizer(vocab_size)
    _check_vocab(tokenizer, vocab_size)
    documents = read_bundled_documents()
    encoded = _encode_bundled(documents, tokenizer)
    train_docs, valid_docs = split_document_indices(len(documents), data_cfg.valid_fraction)
    dtype = token_dtype(tokenizer.vocab_size)
    streams = {name: _join_documents([encoded[i] for i in docs], tokenizer.eos_id, dtype)
               for name, docs in (("train", train_docs), ("valid", valid_docs))}
    data_hash = _hash({"source": "bundled", "text_sha256": bundled_text_sha256(), "tokenizer": tokenizer.sha256,
                       "valid_fraction": data_cfg.valid_fraction, "split_seed": SPLIT_SEED,
                       "seq_len": data_cfg.seq_len})
    titles = ", ".join(documents[i].title for i in valid_docs)
    return DataBundle(
        tokenizer=tokenizer,
        train=PackedSequenceDataset(InMemoryTokens(streams["train"]), data_cfg.seq_len, "train"),
        valid=PackedSequenceDataset(InMemoryTokens(streams["valid"]), data_cfg.seq_len, "valid"),
        tokenizer_hash=tokenizer.sha256, data_hash=data_hash, seed=seed,
        description=(f"bundled Shakespeare: {len(train_docs)} plays / {len(streams['train'])} tokens for train, "
                     f"{len(valid_docs)} ({titles}) / {len(streams['valid'])} tokens for valid"))


def _build_preprocessed(data_cfg, vocab_size: int, seed: int) -> DataBundle:
    data = open_preprocessed(data_cfg.path)   # always checks every shard's presence and size
    if data_cfg.verify_shards:                # the content too: a same-size corruption
        verify_checksums(data)
    meta = data.metadata
    tokenizer = Tokenizer(data_cfg.tokenizer or data.tokenizer_path)
    if tokenizer.sha256 != meta["tokenizer_sha256"]:
        raise DataError(f"tokenizer mismatch: {data_cfg.path}/metadata.json was tokenized with a tokenizer of "
                        f"sha256 {meta['tokenizer_sha256'][:12]}..., but data.tokenizer={tokenizer.path} has "
                        f"sha256 {tokenizer.sha256[:12]}...; unset data.tokenizer to use the directory's own "
                        f"tokenizer.model, or re-run `megasparse data preprocess` with this tokenizer")
    _check_vocab(tokenizer, vocab_size)
    data_hash = _hash({"source": "preprocessed", "content": content_hash(meta),
                       "seq_len": data_cfg.seq_len})
    counts = {s: meta["splits"][s]["num_tokens"] for s in ("train", "valid")}
    return DataBundle(
        tokenizer=tokenizer,
        train=PackedSequenceDataset(data.splits["train"], data_cfg.seq_len, "train"),
        valid=PackedSequenceDataset(data.splits["valid"], data_cfg.seq_len, "valid"),
        tokenizer_hash=tokenizer.sha256, data_hash=data_hash, seed=seed,
        description=f"{data_cfg.path}: {counts['train']} train tokens, {counts['valid']} valid tokens")


def build_data(data_cfg, vocab_size: int, seed: int) -> DataBundle:
    """Tokenizer and map-style train/valid datasets for a `megasparse.config.DataConfig`.

    seed is the sample-order seed (`DataBundle.sampler`); the train/valid split does not use it.
    Call it on rank 0 first when the demo tokenizer may not be cached yet and ranks do not share
    a file system; with a shared cache the file lock in `demo_tokenizer` already suffices.
    """
    if data_cfg.path is None:
        return _build_bundled(data_cfg, vocab_size, seed)
    return _build_preprocessed(data_cfg, vocab_size, seed)
