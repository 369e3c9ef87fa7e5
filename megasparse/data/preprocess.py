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
import resource
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
            if len(inputs) == 1 and os.path.splitext(item)[1] not in BUILDERS:
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
            kwargs = {"sample_by": text_unit} if builder == "text" else {}  # document | paragraph | line
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


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the map workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _column_sum(dataset, column: str) -> float:
    import pyarrow.compute as pc
    return pc.sum(dataset.with_format("arrow")[column]).as_py() or 0


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenize_batch(batch: dict, model_path: str, tokenizer_sha256: str) -> dict:
    # tokenizer_sha256 is unused here; it names the tokenizer in the map's cache fingerprint.
    tokenizer = _TOKENIZERS.get(model_path)
    if tokenizer is None:
        tokenizer = _TOKENIZERS[model_path] = Tokenizer(model_path)
    texts = [t for t in batch["text"] if t]
    cpu = time.process_time()
    ids = tokenizer.encode_batch(texts, num_threads=1)  # parallelism comes from the map processes
    cpu = time.process_time() - cpu
    eos = tokenizer.eos_id
    sizes = [len(t.encode("utf-8")) for t in texts]
    total = max(1, sum(sizes))
    return {"ids": [doc + [eos] for doc in ids], "text_bytes": sizes,
            "encode_cpu_seconds": [cpu * size / total for size in sizes]}  # the batch's CPU time, spread


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
    """Make out_dir ready: new, empty, or a previous output (whose metadata goes first)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        ours = (".bin", ".npy", ".model", ".json", ".tmp")
        foreign = [f for f in os.listdir(out_dir) if not f.endswith(ours)]
        if foreign:
            raise DataError(f"--out {out_dir} is not empty and is not a preprocessed directory "
                            f"(it holds {foreign[:3]}); choose a new or empty directory")
        metadata = os.path.join(out_dir, METADATA_FILE)
        if os.path.isfile(metadata):
            os.remove(metadata)  # first: an interrupted rerun must not look complete
        for old in glob.glob(os.path.join(out_dir, "*.bin")) + glob.glob(os.path.join(out_dir, "*.index.npy")):
            os.remove(old)
    os.makedirs(out_dir, exist_ok=True)


def preprocess(inputs: list[str], tokenizer_path: str, out_dir: str, valid_fraction: float = 0.01,
               num_proc: int = 1, text_field: str = "text", hf_split: str = "train", text_unit: str = "document",
               shard_tokens: int = 1 << 28) -> dict:
    tokenizer = Tokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    _prepare_out_dir(out_dir)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    documents = load_documents(inputs, text_field, hf_split, text_unit)
    loaded = time.perf_counter()
    num_proc = max(1, min(num_proc, len(documents)))
    tokenized = documents.map(
        _tokenize_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
        remove_columns=documents.column_names, desc=f"tokenizing ({num_proc} processes)",
        # datasets fingerprints an importable function by name, not code: a cached result could
        # come from an older version of this module, so always recompute.
        load_from_cache_file=False,
        fn_kwargs={"model_path": os.path.abspath(tokenizer_path), "tokenizer_sha256": tokenizer.sha256})
    tokenized_at = time.perf_counter()
    train_docs, valid_docs = split_document_indices(len(tokenized), valid_fraction)
    splits = {}
    for split, indices in (("train", train_docs), ("valid", valid_docs)):
        splits[split] = _write_split(tokenized.select(indices), out_dir, split, dtype, shard_tokens)
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, TOKENIZER_FILE))
    text_bytes = int(_column_sum(tokenized, "text_bytes"))
    encode_cpu = _column_sum(tokenized, "encode_cpu_seconds")
    total_seconds = time.perf_counter() - started
    total_cpu = _cpu_seconds() - cpu_started
    metadata = {
        "format": FORMAT, "version": VERSION,
        "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
        "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id, "pad_id": tokenizer.pad_id,
        "inputs": list(inputs), "text_unit": text_unit, "valid_fraction": valid_fraction, "split_seed": SPLIT_SEED,
        "num_documents": len(tokenized), "num_tokens": sum(s["num_tokens"] for s in splits.values()),
        "text_bytes": text_bytes, "splits": splits,
    }
    mb = text_bytes / 1e6
    # Per core = per CPU-second actually used, so the figure holds on a shared, busy machine too;
    # the wall-clock figures are given beside it.
    stats = {  # timing lives apart from metadata.json so that reruns give the same data hash
        "text_mb": round(mb, 3), "num_proc": num_proc,
        "wall_seconds": {"load": round(loaded - started, 2), "tokenize": round(tokenized_at - loaded, 2),
                         "split_and_write": round(time.perf_counter() - tokenized_at, 2),
                         "total": round(total_seconds, 2)},
        "cpu_seconds": {"encode": round(encode_cpu, 2), "total_all_processes": round(total_cpu, 2)},
        "encode_mb_per_cpu_second": round(mb / max(encode_cpu, 1e-9), 3),
        "end_to_end_mb_per_cpu_second": round(mb / max(total_cpu, 1e-9), 3),
        "end_to_end_mb_per_wall_second_per_process": round(mb / total_seconds / num_proc, 3),
    }
    with open(os.path.join(out_dir, STATS_FILE), "w") as fh:
        json.dump(stats, fh, indent=2)
    write_metadata(out_dir, metadata)
    print(f"wrote {out_dir}: {metadata['num_documents']} documents, {text_bytes / 1e6:.1f} MB of text -> "
          f"train {splits['train']['num_tokens']} tokens ({splits['train']['num_documents']} docs, "
          f"{len(splits['train']['shards'])} shards), valid {splits['valid']['num_tokens']} tokens "
          f"({splits['valid']['num_documents']} docs), {dtype.name}; {stats['end_to_end_mb_per_cpu_second']} MB of "
          f"text per CPU-second end to end ({stats['encode_mb_per_cpu_second']} in the encoder), "
          f"{total_seconds:.1f} s wall on {num_proc} processes")
    return metadata
