"""`megasparse data preprocess`: text, json, parquet files or a hub dataset -> token shards.

Steps: load with `datasets.load_dataset`; tokenize with `Dataset.map` over num_proc processes,
appending EOS to every document (empty documents are dropped); split train/valid by document
(`splits.split_document_indices`); stream each split into uint16/uint32 shards (`shards.py`).
metadata.json is written last, so a directory without it is an unfinished run.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time

import numpy as np

from megasparse.data.shards import (FORMAT, METADATA_FILE, TOKENIZER_FILE, VERSION, ShardWriter, token_dtype,
                                    write_metadata)
from megasparse.data.splits import SPLIT_SEED, split_document_indices
from megasparse.data.tokenizer import Tokenizer
from megasparse.errors import DataError

BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
STATS_FILE = "stats.json"


def _local_files(inputs: list[str]) -> list[str] | None:
    """Expanded local paths, or None when the input is a hub dataset name."""
    files: list[str] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else ([item] if os.path.exists(item) else [])
        if not matches:
            if len(inputs) == 1 and not os.path.splitext(item)[1] in BUILDERS:
                return None  # not a file: treat as a hub name
            raise DataError(f"input {item} does not exist (no file or glob match); pass existing "
                            f".txt/.jsonl/.json/.parquet files or a Hugging Face dataset name")
        files.extend(matches)
    return files


def load_documents(inputs: list[str], text_field: str = "text", hf_split: str = "train",
                   text_unit: str = "document"):
    """A `datasets.Dataset` with one column "text", one row per document, in input order."""
    import datasets

    files = _local_files(inputs)
    if files is None:
        name, _, config = inputs[0].partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=hf_split)
        except Exception as err:  # datasets raises many types for "not found / offline"
            raise DataError(f"could not load the Hugging Face dataset {inputs[0]!r} split {hf_split!r} ({err}); "
                            f"check the name (name or name:config) and network access, or pass local files") from err
        parts = [ds]
    else:
        parts = []
        for file in files:  # one load per file keeps the order of the inputs
            builder = BUILDERS.get(os.path.splitext(file)[1].lower())
            if builder is None:
                raise DataError(f"input {file}: unknown extension; use one of {sorted(BUILDERS)}")
            kwargs = {"sample_by": {"document": "document", "paragraph": "paragraph", "line": "line"}[text_unit]} \
                if builder == "text" else {}
            parts.append(datasets.load_dataset(builder, data_files=[file], split="train", **kwargs))
    out = []
    for part in parts:
        field = "text" if "text" in part.column_names and part.info.builder_name == "text" else text_field
        if field not in part.column_names:
            raise DataError(f"input {inputs} has no column {field!r} (columns: {part.column_names}); "
                            f"pass --text-field")
        part = part.select_columns([field])
        out.append(part.rename_column(field, "text") if field != "text" else part)
    return datasets.concatenate_datasets(out) if len(out) > 1 else out[0]


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenize_batch(batch: dict, model_path: str, tokenizer_sha256: str) -> dict:
    # tokenizer_sha256 is unused here but part of the map fingerprint: a retrained tokenizer at
    # the same path must not hit the datasets cache of the old one.
    tokenizer = _TOKENIZERS.get(model_path)
    if tokenizer is None:
        tokenizer = _TOKENIZERS[model_path] = Tokenizer(model_path)
    texts = [t for t in batch["text"] if t]
    ids = tokenizer.encode_batch(texts)
    eos = tokenizer.eos_id
    return {"ids": [doc + [eos] for doc in ids], "text_bytes": [len(t.encode("utf-8")) for t in texts]}


def _write_split(dataset, out_dir: str, split: str, dtype: np.dtype, shard_tokens: int) -> dict:
    from tqdm.auto import tqdm
    writer = ShardWriter(out_dir, split, dtype, shard_tokens)
    with tqdm(total=len(dataset), desc=f"writing {split}", unit="doc") as bar:
        for batch in dataset.with_format("arrow").iter(batch_size=4096):
            for chunk in batch.column("ids").chunks:
                lengths = chunk.value_lengths().to_numpy()
                writer.write(chunk.flatten().to_numpy(), lengths)
            bar.update(batch.num_rows)
    return writer.finish()


def _prepare_out_dir(out_dir: str) -> None:
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, METADATA_FILE)):
            leftovers = [f for f in os.listdir(out_dir) if not f.endswith((".bin", ".npy", ".model", ".json", ".tmp"))]
            if leftovers:
                raise DataError(f"--out {out_dir} is not empty and is not a preprocessed directory "
                                f"(it holds {leftovers[:3]}); choose a new or empty directory")
        os.remove(os.path.join(out_dir, METADATA_FILE)) if os.path.isfile(os.path.join(out_dir, METADATA_FILE)) else None
        for old in glob.glob(os.path.join(out_dir, "*.bin")) + glob.glob(os.path.join(out_dir, "*.index.npy")):
            os.remove(old)
    os.makedirs(out_dir, exist_ok=True)


def preprocess(inputs: list[str], tokenizer_path: str, out_dir: str, valid_fraction: float = 0.01,
               num_proc: int = 1, text_field: str = "text", hf_split: str = "train", text_unit: str = "document",
               shard_tokens: int = 1 << 28) -> dict:
    tokenizer = Tokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    _prepare_out_dir(out_dir)
    started = time.perf_counter()
    documents = load_documents(inputs, text_field, hf_split, text_unit)
    loaded = time.perf_counter()
    num_proc = max(1, min(num_proc, len(documents)))
    tokenized = documents.map(
        _tokenize_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
        remove_columns=documents.column_names, desc=f"tokenizing ({num_proc} processes)",
        fn_kwargs={"model_path": os.path.abspath(tokenizer_path), "tokenizer_sha256": tokenizer.sha256})
    tokenize_seconds = time.perf_counter() - loaded
    train_docs, valid_docs = split_document_indices(len(tokenized), valid_fraction)
    splits = {}
    for split, indices in (("train", train_docs), ("valid", valid_docs)):
        splits[split] = _write_split(tokenized.select(indices), out_dir, split, dtype, shard_tokens)
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, TOKENIZER_FILE))
    text_bytes = int(np.sum(tokenized.with_format("numpy")["text_bytes"]))
    total_seconds = time.perf_counter() - started
    metadata = {
        "format": FORMAT, "version": VERSION,
        "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
        "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id, "pad_id": tokenizer.pad_id,
        "inputs": list(inputs), "text_unit": text_unit, "valid_fraction": valid_fraction, "split_seed": SPLIT_SEED,
        "num_documents": len(tokenized), "num_tokens": sum(s["num_tokens"] for s in splits.values()),
        "text_bytes": text_bytes, "splits": splits,
    }
    stats = {  # timing lives apart from metadata.json so that reruns give the same data hash
        "num_proc": num_proc, "load_seconds": round(loaded - started, 3),
        "tokenize_seconds": round(tokenize_seconds, 3), "total_seconds": round(total_seconds, 3),
        "tokenize_mb_per_s_per_core": round(text_bytes / 1e6 / tokenize_seconds / num_proc, 3),
        "end_to_end_mb_per_s_per_core": round(text_bytes / 1e6 / total_seconds / num_proc, 3),
    }
    with open(os.path.join(out_dir, STATS_FILE), "w") as fh:
        json.dump(stats, fh, indent=2)
    write_metadata(out_dir, metadata)
    print(f"wrote {out_dir}: {metadata['num_documents']} documents, {text_bytes / 1e6:.1f} MB of text -> "
          f"train {splits['train']['num_tokens']} tokens ({splits['train']['num_documents']} docs, "
          f"{len(splits['train']['shards'])} shards), valid {splits['valid']['num_tokens']} tokens "
          f"({splits['valid']['num_documents']} docs), {dtype.name}; tokenizing {stats['tokenize_mb_per_s_per_core']} "
          f"MB/s/core on {num_proc} processes, {total_seconds:.1f} s in all")
    return metadata
