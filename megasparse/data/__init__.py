"""Data: bundled demo text, sentencepiece tokenizer, preprocessed token shards, datasets, sampler.

The trainer needs only::

    bundle = build_data(cfg.data, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed)
    sampler = GlobalBatchSampler(len(bundle.train), G, dp_rank, dp_size, seed, consumed_samples)

See docs/data.md.
"""
from megasparse.data.build import DataBundle, build_data
from megasparse.data.packed import PackedSequenceDataset
from megasparse.data.sampler import GlobalBatchSampler
from megasparse.data.tokenizer import Tokenizer, demo_tokenizer, train_tokenizer

__all__ = ["DataBundle", "build_data", "GlobalBatchSampler", "PackedSequenceDataset", "Tokenizer",
           "demo_tokenizer", "train_tokenizer"]
