"""GCIDE (the GNU Collaborative International Dictionary of English) from the dictd files of
the Debian package `dict-gcide`: one document per dictionary entry, markup stripped.

The dictd index lists (headword, offset, length) with numbers in base64 digits; several
headwords can share one entry, so entries are deduplicated by offset.
"""
from __future__ import annotations

import gzip
import re
import unicodedata
from typing import Iterator

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_SOURCE_TAG_LINE = re.compile(r"^\s*\[(?:\d{4} Webster|WordNet|PJC|Webster|Century|Chambers)[^\]]*\]\s*$")
_SOURCE_TAG = re.compile(r"\s*\[(?:\d{4} Webster|WordNet[^\]]*|PJC|Webster 1913 Suppl\.)\]")
_PRONUNCIATION = re.compile(r"^(\S[^\\\n]*?) \\[^\\\n]*\\", re.M)   # headword \pro*nun"ci*a`tion\ -> headword
_BRACES = re.compile(r"[{}]")
# "Abbess ([a^]b"b[e^]s), n." -> "Abbess, n.": a parenthesised respelling right after the headword
_RESPELLING = re.compile(r'^([^\n(]+?) \(([^)\n]*[\[*"`][^)\n]*)\)', re.M)
# GCIDE writes accents in ASCII: ['e] is e-acute, [=a] a-macron, [a^] a-breve, [~n] n-tilde, ...
_COMBINING = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "^": "\u0302", "~": "\u0303", ",": "\u0327",
              "=": "\u0304", "-": "\u0304", ".": "\u0307"}
_ACCENT_BEFORE = re.compile(r"\[([`'\"^~,=.-])([A-Za-z])\]")
_ACCENT_AFTER = re.compile(r"\[([A-Za-z])\^\]")
_LIGATURES = {"[ae]": "\u00e6", "[AE]": "\u00c6", "[oe]": "\u0153", "[OE]": "\u0152", "[=ae]": "\u01e3",
              "[imac]": "\u012b", "[root]": "\u221a", "[eth]": "\u00f0", "[thorn]": "\u00fe", "[deg]": "\u00b0",
              "[sect]": "\u00a7", "[yogh]": "\u021d", "[ng]": "\u014b", "[aum]": "\u00e4"}


def _b64_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def clean_entry(raw: str) -> str:
    lines = [line for line in raw.split("\n") if not _SOURCE_TAG_LINE.match(line)]
    text = "\n".join(line[3:] if line.startswith("   ") else line for line in lines)  # dictd indents 3
    text = _SOURCE_TAG.sub("", text)
    text = _PRONUNCIATION.sub(r"\1", text)
    text = _RESPELLING.sub(r"\1", text)
    text = _ACCENT_BEFORE.sub(lambda m: m.group(2) + _COMBINING[m.group(1)], text)
    text = _ACCENT_AFTER.sub(lambda m: m.group(1) + "\u0306", text)
    for code, char in _LIGATURES.items():
        text = text.replace(code, char)
    text = unicodedata.normalize("NFC", text)
    text = _BRACES.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def read_entries(index_path: str, dict_dz_path: str) -> Iterator[str]:
    """Cleaned entries in dictionary order; dictzip (.dz) files are gzip-compatible."""
    with gzip.open(dict_dz_path, "rb") as fh:
        data = fh.read()
    seen = set()
    with open(index_path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
                continue
            offset, length = _b64_number(parts[1]), _b64_number(parts[2])
            if offset in seen:
                continue
            seen.add(offset)
            text = clean_entry(data[offset:offset + length].decode("utf-8", errors="replace"))
            if text:
                yield text
