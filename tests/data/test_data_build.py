import numpy as np
import pytest
import torch

from megasparse.config import DataConfig
from megasparse.data import build_data
from megasparse.data.bundled import parse_documents, read_bundled_documents
from megasparse.errors import DataError


@pytest.fixture(scope="module")
def bundle():
    return build_data(DataConfig(seq_len=64), vocab_size=512, seed=1)


def test_bundled_text_is_several_plays_under_2mb():
    import os

    from megasparse.data.bundled import BUNDLED_TEXT
    assert os.path.getsize(BUNDLED_TEXT) <= 2_000_000
    docs = read_bundled_documents()
    assert len(docs) >= 10 and any(d.title == "Hamlet" for d in docs)
    assert all(len(d.text) > 10_000 and "<|document|>" not in d.text for d in docs)


def test_build_data_on_bundled_text(bundle):
    tok = bundle.tokenizer
    assert tok.vocab_size == 512 and bundle.tokenizer_hash == tok.sha256
    assert len(bundle.train) > 10 * len(bundle.valid) > 0
    sample = bundle.train[5]
    assert sample.dtype == torch.long and sample.shape == (65,)
    # consecutive samples share one token, so every token is predicted once
    assert bundle.train[5][-1] == bundle.train[6][0]
    # the train stream is the plays' own encodings joined with EOS
    docs = read_bundled_documents()
    stream = bundle.train.tokens.tokens
    eos_positions = np.flatnonzero(stream == tok.eos_id)
    assert len(eos_positions) == len(docs) - 1  # one EOS per train play (one play held out)
    first_doc = stream[:eos_positions[0]].tolist()
    assert tok.decode(first_doc) in {d.text for d in docs}
    with pytest.raises(IndexError):
        bundle.train[len(bundle.train)]


def test_build_data_is_deterministic_and_hashes_depend_on_seq_len(bundle):
    again = build_data(DataConfig(seq_len=64), vocab_size=512, seed=1)
    assert again.data_hash == bundle.data_hash and torch.equal(again.train[17], bundle.train[17])
    other = build_data(DataConfig(seq_len=32), vocab_size=512, seed=1)
    assert other.data_hash != bundle.data_hash


def test_vocab_mismatch_tells_the_fix(bundle):
    with pytest.raises(DataError, match="set model.vocab_size=512"):
        build_data(DataConfig(seq_len=64, tokenizer=bundle.tokenizer.path), vocab_size=1024, seed=1)


def test_resume_check_names_the_mismatch(bundle):
    bundle.check_resume(bundle.tokenizer_hash, bundle.data_hash, "ckpt")  # same: fine
    with pytest.raises(DataError, match="tokenizer sha256"):
        bundle.check_resume("0" * 64, bundle.data_hash, "checkpoint step 10")
    with pytest.raises(DataError, match="checkpoint step 10 was trained on data with hash 000000000000"):
        bundle.check_resume(bundle.tokenizer_hash, "0" * 64, "checkpoint step 10")


def test_restart_reads_the_same_batches(bundle):
    """Tokens at consumed_samples=k: straight through vs a fresh build_data + sampler (a restart)."""
    import itertools
    G, steps, k = 8, 12, 7
    straight = bundle.sampler(G, dp_rank=1, dp_size=2)
    straight_batches = [torch.stack([bundle.train[i] for i in idx]) for idx in itertools.islice(straight, steps)]
    restarted = build_data(DataConfig(seq_len=64), vocab_size=512, seed=1)
    resumed = restarted.sampler(G, dp_rank=1, dp_size=2, consumed_samples=k * G)
    for step, idx in zip(range(k, steps), resumed):
        assert torch.equal(torch.stack([restarted.train[i] for i in idx]), straight_batches[step])


def test_document_markers_round_trip():
    text = "<|document|> A\nline one\n\nline two\n<|document|> B\nthree\n"
    docs = parse_documents(text, "x")
    assert [(d.title, d.text) for d in docs] == [("A", "line one\n\nline two"), ("B", "three")]
    with pytest.raises(DataError, match="before the first"):
        parse_documents("stray\n<|document|> A\nx", "file.txt")
