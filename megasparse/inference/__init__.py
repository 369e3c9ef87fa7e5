"""Inference on exported models (docs/export.md).

    load_pretrained(path, device="cpu", dtype=None, mlp_backend="auto") -> SparseLlama (eval mode)
    load_tokenizer(path) -> sentencepiece.SentencePieceProcessor
"""
from megasparse.inference.loader import load_pretrained, load_tokenizer

__all__ = ["load_pretrained", "load_tokenizer"]
