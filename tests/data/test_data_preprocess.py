import json
import os

import numpy as np
import pytest
import torch

from megasparse.config import DataConfig
from megasparse.data import build_data, demo_tokenizer, train_tokenizer
from megasparse.data.preprocess import preprocess
from megasparse.data.shards import open_preprocessed, verify_checksums
from megasparse.errors import DataError

DOCS = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(40 + i)) + ("\n\nÜber 🙂" if i % 5 == 0 else "")
        for i in range(60)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    path = root / "docs.jsonl"
    with open(path, "w") as fh:
        for i, text in enumerate(DOCS):
            fh.write(json.dumps({"text": text, "source": "test", "n": i}) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(vocab):
    return demo_tokenizer(vocab)


@pytest.fixture(scope="module")
def preprocessed(corpus, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "out"
    # tiny shards so that documents and samples cross shard boundaries
    preprocess([str(corpus)], tokenizer.path, str(out), valid_fraction=0.1, num_proc=2, shard_tokens=500)
    return out


def _config(path, **kw):
    return DataConfig(path=str(path), seq_len=32, **kw)


def test_shards_hold_exactly_the_tokenizers_encoding(preprocessed, tokenizer):
    data = open_preprocessed(str(preprocessed))
    meta = data.metadata
    assert meta["dtype"] == "uint16" and meta["num_documents"] == len(DOCS)
    assert len(meta["splits"]["train"]["shards"]) > 2  # the test exercises several shards
    seen = {}
    for split in ("train", "valid"):
        stream = data.splits[split].read(0, data.splits[split].num_tokens)
        ends = data.document_ends(split)
        starts = np.concatenate([[0], ends[:-1]])
        for start, end in zip(starts, ends):
            doc = stream[start:end].tolist()
            assert doc[-1] == tokenizer.eos_id
            text = tokenizer.decode(doc[:-1])
            assert tokenizer.encode(text) == doc[:-1]
            seen[text] = split
    assert set(seen) == set(DOCS)  # every document once, nothing lost or invented
    valid = [t for t, s in seen.items() if s == "valid"]
    assert len(valid) == 6
    # the split is by whole document and documents keep their input order within a split
    train_stream = data.splits["train"].read(0, 200).tolist()
    first_train = next(t for t in DOCS if seen[t] == "train")
    assert train_stream[:len(tokenizer.encode(first_train))] == tokenizer.encode(first_train)
    verify_checksums(data)


def test_build_data_reads_samples_across_shards(preprocessed, tokenizer, vocab):
    bundle = build_data(_config(preprocessed), vocab_size=vocab, seed=0)
    assert bundle.tokenizer_hash == tokenizer.sha256
    stream = open_preprocessed(str(preprocessed)).splits["train"].read(0, 10 ** 6)
    for i in (0, 1, 15, len(bundle.train) - 1):
        assert torch.equal(bundle.train[i], torch.from_numpy(stream[i * 32:i * 32 + 33].astype(np.int64)))
    assert len(bundle.train) == (len(stream) - 1) // 32


def test_preprocessing_is_deterministic(corpus, tokenizer, preprocessed, tmp_path, vocab):
    again = tmp_path / "again"
    preprocess([str(corpus)], tokenizer.path, str(again), valid_fraction=0.1, num_proc=1, shard_tokens=500)
    a = build_data(_config(preprocessed), vocab_size=vocab, seed=0)
    b = build_data(_config(again), vocab_size=vocab, seed=0)
    assert a.data_hash == b.data_hash


def _decoded_documents(path, tokenizer):
    data = open_preprocessed(str(path))
    out = []
    for split in ("train", "valid"):
        stream = data.splits[split].read(0, data.splits[split].num_tokens)
        ends = data.document_ends(split)
        out += [tokenizer.decode(stream[a:b - 1]) for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]
    return out


def test_text_files_one_document_per_file(tmp_path, tokenizer):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(DOCS[i])
    out = tmp_path / "out"
    preprocess([str(tmp_path / "*.txt")], tokenizer.path, str(out), valid_fraction=0.25)
    assert sorted(_decoded_documents(out, tokenizer)) == sorted(DOCS[:4])


def test_parquet_input_with_another_text_field(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": DOCS[:5], "id": list(range(5))}), tmp_path / "docs.parquet")
    out = tmp_path / "out"
    preprocess([str(tmp_path / "docs.parquet")], tokenizer.path, str(out), valid_fraction=0.2, text_field="body")
    assert sorted(_decoded_documents(out, tokenizer)) == sorted(DOCS[:5])


def test_missing_input_and_foreign_out_dir_are_clear(tmp_path, tokenizer):
    with pytest.raises(DataError, match="input .*nope.jsonl does not exist"):
        preprocess([str(tmp_path / "nope.jsonl")], tokenizer.path, str(tmp_path / "out"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.md").write_text("mine")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="not a preprocessed directory"):
        preprocess([str(tmp_path / "a.txt")], tokenizer.path, str(tmp_path / "busy"))


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_names_the_file(preprocessed, tmp_path, vocab):
    broken = _copy(preprocessed, tmp_path / "broken")
    shard = broken / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(DataError, match="train-00001.bin is truncated or corrupt"):
        build_data(_config(broken), vocab_size=vocab, seed=0)


def test_missing_shard_names_the_file(preprocessed, tmp_path, vocab):
    broken = _copy(preprocessed, tmp_path / "broken")
    os.remove(broken / "valid-00000.bin")
    with pytest.raises(DataError, match="valid-00000.bin is missing"):
        build_data(_config(broken), vocab_size=vocab, seed=0)


def test_corrupt_shard_names_the_file(preprocessed, tmp_path, vocab):
    broken = _copy(preprocessed, tmp_path / "broken")
    shard = broken / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[0:20] = b"\xff" * 20  # ids of 65535, far beyond the vocab
    shard.write_bytes(bytes(data))
    bundle = build_data(_config(broken), vocab_size=vocab, seed=0)  # sizes are fine ...
    with pytest.raises(DataError, match="train-00000.bin is corrupt"):
        bundle.train[0]  # ... the bad ids are caught when read
    with pytest.raises(DataError, match="train-00000.bin is corrupt: its sha256"):
        verify_checksums(open_preprocessed(str(broken)))


def test_same_size_valid_id_corruption_is_caught_by_verification(preprocessed, tmp_path, vocab, capsys):
    """Two tokens swapped: sizes and ids stay valid, so only the sha256 can tell."""
    from megasparse.cli import main
    assert main(["data", "verify", str(preprocessed)]) == 0
    assert "every sha256 matches" in capsys.readouterr().out
    broken = _copy(preprocessed, tmp_path / "broken")
    shard = broken / "valid-00000.bin"
    data = bytearray(shard.read_bytes())
    item = open_preprocessed(str(broken)).splits["valid"].dtype.itemsize
    first, second = bytes(data[:item]), bytes(data[item:2 * item])
    assert first != second
    data[:item], data[item:2 * item] = second, first
    shard.write_bytes(bytes(data))
    build_data(_config(broken), vocab_size=vocab, seed=0)        # opening checks sizes only
    with pytest.raises(DataError, match="valid-00000.bin is corrupt: its sha256"):
        build_data(_config(broken, verify_shards=True), vocab_size=vocab, seed=0)
    assert main(["data", "verify", str(broken)]) == 2
    assert "valid-00000.bin is corrupt" in capsys.readouterr().err


def test_tokenizer_hash_mismatch_is_a_clear_error(preprocessed, tmp_path, vocab):
    from megasparse.data.bundled import read_bundled_text
    other_text = tmp_path / "other.txt"
    other_text.write_text(read_bundled_text().upper())  # same size of vocab, different pieces
    other = train_tokenizer([str(other_text)], vocab, str(tmp_path / "other.model"))
    with pytest.raises(DataError, match="tokenizer mismatch: .*was tokenized with a tokenizer of sha256"):
        build_data(_config(preprocessed, tokenizer=other.path), vocab_size=vocab, seed=0)


def test_missing_directory_and_unfinished_run(tmp_path, vocab):
    with pytest.raises(DataError, match="is not a directory"):
        build_data(_config(tmp_path / "nope"), vocab_size=vocab, seed=0)
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="metadata.json does not exist"):
        build_data(_config(tmp_path / "half"), vocab_size=vocab, seed=0)
