"""The on-disk format of a preprocessed directory, and its reader.

    DIR/metadata.json         format, tokenizer_sha256, vocab_size, eos_id, dtype, counts, splits
    DIR/tokenizer.model       a copy of the tokenizer, so the directory is self-contained
    DIR/<split>-NNNNN.bin     raw token ids (uint16 when vocab_size <= 65536, else uint32)
    DIR/<split>.index.npy     int64 end offset of every document in the split's token stream

Each document's tokens end with EOS, so document d spans [index[d-1], index[d]) and its last
token is EOS. Shards are cut at document boundaries once they pass a size limit.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from megasparse.data.token_store import ShardedTokens
from megasparse.errors import DataError

FORMAT = "megasparse-tokens"
VERSION = 1
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "valid")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.bin"


def index_name(split: str) -> str:
    return f"{split}.index.npy"


class ShardWriter:
    """Appends documents (already ending in EOS) to numbered shard files of one split."""

    def __init__(self, out_dir: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype = out_dir, split, np.dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self.doc_ends: list[np.ndarray] = []
        self.num_tokens = 0
        self._file = None
        self._hash = None
        self._in_shard = 0

    def _open_next(self) -> None:
        self._close()
        name = shard_name(self.split, len(self.shards))
        self._file = open(os.path.join(self.out_dir, name), "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "num_tokens": 0})
        self._in_shard = 0

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1]["num_tokens"] = self._in_shard
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._file = None

    def write(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """tokens: the concatenation of whole documents whose lengths are doc_lengths."""
        if len(tokens) == 0:
            return
        if self._file is None or self._in_shard >= self.shard_tokens:
            self._open_next()
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._in_shard += len(tokens)
        self.doc_ends.append(self.num_tokens + np.cumsum(doc_lengths, dtype=np.int64))
        self.num_tokens += len(tokens)

    def finish(self) -> dict:
        self._close()
        ends = np.concatenate(self.doc_ends) if self.doc_ends else np.zeros(0, np.int64)
        np.save(os.path.join(self.out_dir, index_name(self.split)), ends)
        return {"num_documents": int(len(ends)), "num_tokens": int(self.num_tokens),
                "index": index_name(self.split), "shards": self.shards}


def write_metadata(out_dir: str, metadata: dict) -> None:
    tmp = os.path.join(out_dir, METADATA_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(metadata, fh, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, METADATA_FILE))  # the directory is complete only now


def read_metadata(path: str) -> dict:
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.isdir(path):
        raise DataError(f"data.path={path} is not a directory; point it at the output of "
                        f"`megasparse data preprocess`, or leave it unset for the bundled demo text")
    if not os.path.isfile(meta_path):
        raise DataError(f"{meta_path} does not exist: {path} is not a finished `megasparse data preprocess` "
                        f"output (re-run preprocessing)")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except ValueError as err:
        raise DataError(f"{meta_path} is not valid JSON ({err}); re-run `megasparse data preprocess`") from err
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{meta_path} has format {meta.get('format')!r} version {meta.get('version')!r}; "
                        f"expected {FORMAT!r} version {VERSION}; re-run `megasparse data preprocess`")
    return meta


def content_hash(metadata: dict) -> str:
    """Identifies the tokens: the tokenizer, the dtype and every shard's sha256 and size."""
    content = {key: metadata[key] for key in ("tokenizer_sha256", "dtype", "splits")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


@dataclass
class PreprocessedData:
    path: str
    metadata: dict
    splits: dict[str, ShardedTokens]

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.path, TOKENIZER_FILE)

    def document_ends(self, split: str) -> np.ndarray:
        return np.load(os.path.join(self.path, self.metadata["splits"][split]["index"]))


def open_preprocessed(path: str) -> PreprocessedData:
    """Open a directory, checking that every shard exists and has the size metadata.json says."""
    meta = read_metadata(path)
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for split in SPLITS:
        info = meta["splits"].get(split)
        if info is None:
            raise DataError(f"{os.path.join(path, METADATA_FILE)} has no '{split}' split; re-run preprocessing")
        files, counts = [], []
        for shard in info["shards"]:
            file = os.path.join(path, shard["file"])
            expected = shard["num_tokens"] * dtype.itemsize
            if not os.path.isfile(file):
                raise DataError(f"shard {file} is missing (listed in {METADATA_FILE}); re-run `megasparse data "
                                f"preprocess` or restore the file")
            actual = os.path.getsize(file)
            if actual != expected:
                raise DataError(f"shard {file} is truncated or corrupt: {actual} bytes, expected {expected} "
                                f"({shard['num_tokens']} {dtype.name} tokens); re-run `megasparse data preprocess`")
            files.append(file)
            counts.append(shard["num_tokens"])
        splits[split] = ShardedTokens(files, counts, dtype.name, meta["vocab_size"])
    return PreprocessedData(path=path, metadata=meta, splits=splits)


def verify_checksums(data: PreprocessedData) -> None:
    """Hash every shard against metadata.json (reads all the data): `megasparse data verify`, and
    at start-up with data.verify_shards=true. Opening a directory checks only sizes."""
    for split in SPLITS:
        for shard in data.metadata["splits"][split]["shards"]:
            file = os.path.join(data.path, shard["file"])
            digest = hashlib.sha256()
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
            if digest.hexdigest() != shard["sha256"]:
                raise DataError(f"shard {file} is corrupt: its sha256 differs from {METADATA_FILE}; "
                                f"re-run `megasparse data preprocess`")
