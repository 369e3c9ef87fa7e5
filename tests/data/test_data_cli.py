"""`megasparse data tokenizer` and `data preprocess` through the real CLI, then a DataLoader."""
import itertools
import json

import torch
from torch.utils.data import DataLoader

from megasparse.cli import main
from megasparse.config import DataConfig
from megasparse.data import GlobalBatchSampler, build_data
from megasparse.data.bundled import read_bundled_documents


def test_cli_pipeline_and_dataloader_workers(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as fh:
        for doc in read_bundled_documents()[:4]:
            fh.write(json.dumps({"text": doc.text, "source": "shakespeare"}) + "\n")
    model = tmp_path / "tok.model"
    assert main(["data", "tokenizer", "--input", str(corpus), "--vocab-size", "400", "--out", str(model)]) == 0
    assert "UNK=0 BOS=1 EOS=2 PAD=3" in capsys.readouterr().out
    out = tmp_path / "shards"
    assert main(["data", "preprocess", "--input", str(corpus), "--tokenizer", str(model), "--out", str(out),
                 "--num-proc", "1", "--valid-fraction", "0.25"]) == 0
    assert (out / "tokenizer.model").read_bytes() == model.read_bytes()

    bundle = build_data(DataConfig(path=str(out), seq_len=16), vocab_size=400, seed=3)
    sampler = GlobalBatchSampler(len(bundle.train), global_batch_size=4, dp_rank=1, dp_size=2, seed=3)
    # a worker process gets the dataset pickled: shards must reopen there, not travel as pages
    loader = DataLoader(bundle.train, batch_sampler=sampler, num_workers=1)
    expected = GlobalBatchSampler(len(bundle.train), 4, 1, 2, seed=3)
    for batch, indices in zip(itertools.islice(loader, 3), itertools.islice(iter(expected), 3)):
        assert torch.equal(batch, torch.stack([bundle.train[i] for i in indices]))


def test_cli_reports_missing_input_as_one_line(tmp_path, capsys):
    code = main(["data", "tokenizer", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "400",
                 "--out", str(tmp_path / "t.model")])
    assert code == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
