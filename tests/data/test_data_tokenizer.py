import os

import pytest

from megasparse.data import Tokenizer, demo_tokenizer, train_tokenizer
from megasparse.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from megasparse.errors import DataError

TRICKY = "  Leading spaces,\ttabs,\r\nCRLF, double  spaces, 12345, ünïcödé, 漢字, emoji 🙂\n\n\ntrailing \n"


def test_demo_tokenizer_round_trip_is_lossless_and_special_ids_are_fixed(vocab):
    tok = demo_tokenizer(vocab)
    assert tok.vocab_size == vocab
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2, 3)
    ids = tok.encode(TRICKY)
    assert UNK_ID not in ids  # byte fallback, never unk
    assert tok.decode(ids) == TRICKY


def test_demo_tokenizer_is_cached_and_reproducible(vocab):
    first = demo_tokenizer(vocab)
    assert first.path.startswith(os.environ["MEGASPARSE_CACHE"])
    mtime = os.path.getmtime(first.path)
    again = demo_tokenizer(vocab)
    assert again.path == first.path and os.path.getmtime(again.path) == mtime  # not rebuilt
    # a fresh build of the same inputs gives the same bytes (ranks without a shared cache agree)
    os.replace(first.path, first.path + ".old")
    rebuilt = demo_tokenizer(vocab)
    assert rebuilt.sha256 == first.sha256


def test_train_tokenizer_on_files(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "pack my box with five dozen liquor jugs", "source": "x"}\n' * 200)
    tok = train_tokenizer([str(text), str(jsonl)], 300, str(tmp_path / "tok.model"))
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode(TRICKY)) == TRICKY
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # it learned merges


def test_missing_tokenizer_file_names_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.model does not exist"):
        Tokenizer(str(tmp_path / "nope.model"))
