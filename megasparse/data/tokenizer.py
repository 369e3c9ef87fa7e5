"""A thin wrapper over sentencepiece, plus training and the cached demo tokenizer.

Special tokens (fixed ids in every tokenizer megasparse trains):

    UNK = 0   never produced for text: byte fallback encodes any unseen character as bytes
    BOS = 1   not added by `encode`; available to callers that want it
    EOS = 2   appended after every document when documents are joined into a token stream
    PAD = 3   not used by the packed datasets (every sequence is full); reserved for inference

The round trip ``decode(encode(s)) == s`` holds for any str: normalisation is the identity,
whitespace is kept as is (no dummy prefix, no collapsing), and byte fallback covers every
character the vocabulary lacks.

Concurrency: `demo_tokenizer` trains under an exclusive file lock and publishes the model with
an atomic rename, so processes that share the cache directory never see a partial file and
build it once. Training is also deterministic (same text, size and settings give the same
bytes), so processes on machines that do not share the cache get the same tokenizer hash.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from typing import Iterable, Iterator

from megasparse.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# Everything that changes the trained model; part of the demo cache key.
TRAINER_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    character_coverage=1.0,
    unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
    max_sentence_length=16384,
)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """A trained sentencepiece model. `sha256` identifies it in data metadata and checkpoints."""

    def __init__(self, model_path: str):
        import sentencepiece as spm
        if not os.path.isfile(model_path):
            raise DataError(f"tokenizer file {model_path} does not exist; pass a sentencepiece .model "
                            f"(train one with `megasparse data tokenizer`) or leave data.tokenizer unset "
                            f"to use the demo tokenizer")
        self.path = model_path
        self.sha256 = file_sha256(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as err:
            raise DataError(f"tokenizer file {model_path} is not a valid sentencepiece model ({err}); "
                            f"retrain it with `megasparse data tokenizer`") from err

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """num_threads=-1 uses every core; pass 1 inside worker processes to avoid oversubscription."""
        return self._sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    # sentencepiece trains on "sentences"; lines are the natural unit and newlines are encoded
    # at inference time through byte fallback, so they need not appear in training input.
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def _read_input_texts(input_files: list[str]) -> Iterator[str]:
    """Plain text files, or jsonl files with a "text" field (what `data corpus` writes)."""
    for path in input_files:
        if not os.path.isfile(path):
            raise DataError(f"tokenizer input {path} does not exist")
        with open(path, encoding="utf-8", errors="replace") as fh:
            if path.endswith((".jsonl", ".json")):
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (ValueError, KeyError, TypeError) as err:
                            raise DataError(f"{path}:{line_no}: expected a JSON object with a \"text\" field "
                                            f"({err})") from err
            else:
                yield fh.read()


def train_tokenizer_from_texts(texts: Iterable[str], vocab_size: int, out_path: str,
                               max_sentences: int = 2_000_000, num_threads: int | None = None) -> Tokenizer:
    """Train a BPE model on texts and write it atomically to out_path."""
    import sentencepiece as spm
    if vocab_size < 300:
        raise DataError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 + 4 ids; use >= 300")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts), model_writer=model, vocab_size=vocab_size,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2, **TRAINER_SETTINGS)
    except RuntimeError as err:
        raise DataError(f"sentencepiece could not train a vocab of {vocab_size} on this text ({err}); "
                        f"use a smaller --vocab-size or more text") from err
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{out_path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(model.getvalue())
    os.replace(tmp, out_path)
    return Tokenizer(out_path)


def train_tokenizer(input_files: list[str], vocab_size: int, out_path: str, **kwargs) -> Tokenizer:
    """Train on text or jsonl files (see `_read_input_texts`)."""
    return train_tokenizer_from_texts(_read_input_texts(list(input_files)), vocab_size, out_path, **kwargs)


def cache_dir() -> str:
    return os.environ.get("MEGASPARSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megasparse")


def demo_tokenizer(vocab_size: int) -> Tokenizer:
    """The tokenizer of the bundled text, trained on first use and cached by content hash."""
    import sentencepiece as spm
    from megasparse.data.bundled import read_bundled_documents, read_bundled_text

    key_material = json.dumps({"text": hashlib.sha256(read_bundled_text().encode()).hexdigest(),
                               "vocab_size": vocab_size, "settings": TRAINER_SETTINGS,
                               "sentencepiece": spm.__version__}, sort_keys=True)
    key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
    directory = os.path.join(cache_dir(), "tokenizers")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"demo-{vocab_size}-{key}.model")
    if os.path.isfile(path):
        return Tokenizer(path)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait and then find the file
        if not os.path.isfile(path):
            texts = [doc.text for doc in read_bundled_documents()]
            # One thread keeps training byte-for-byte reproducible across machines.
            train_tokenizer_from_texts(texts, vocab_size, path, num_threads=1)
    return Tokenizer(path)
