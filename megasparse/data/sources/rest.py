"""reStructuredText (Sphinx `_sources/*.rst.txt`) to plain text, by rules rather than a parser.

Sphinx sources use many extension directives that docutils alone rejects, and we only need
readable prose for language modelling: keep paragraphs, lists, titles and literal blocks;
drop markup. Directives whose body is not prose (toctree, images, includes, kernel-doc
stubs, index entries) are dropped with their indented body; for the others only the
directive line goes, and API directives keep their signature (".. function:: f(x)" -> "f(x)").
"""
from __future__ import annotations

import re

_DROP_WITH_BODY = {
    "toctree", "image", "figure", "kernel-figure", "include", "literalinclude", "kernel-include",
    "kernel-doc", "kernel-feat", "kernel-abi", "index", "raw", "only", "tabularcolumns", "highlight",
    "contents", "sectionauthor", "moduleauthor", "cssclass", "c:namespace", "c:namespace-push",
    "c:namespace-pop", "currentmodule", "module", "testsetup", "testcleanup", "csv-table", "flat-table",
    "audit-event", "audit-event-table", "impl-detail", "default-domain", "role", "program",
}
_KEEP_SIGNATURE = re.compile(r"^(?:[a-z]+:)?(?:function|method|class|data|attribute|exception|macro|type|"
                             r"member|var|struct|enum|decorator|classmethod|staticmethod|coroutinemethod|"
                             r"coroutinefunction|envvar|cmdoption|option|opcode|pdbcommand|describe|"
                             r"abstractmethod|property)$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::\s*(.*)$")
_COMMENT_OR_TARGET = re.compile(r"^(\s*)\.\.(\s|$)")  # comments, `.. _label:`, footnotes, substitutions
_SECTION_RULE = re.compile(r"^\s*([=\-~^\"'`#*+<>_.:])\1{2,}\s*$")
_FIELD_OPTION = re.compile(r"^\s*:[\w -]+:( .*)?$")

_ROLE_WITH_TARGET = re.compile(r":[\w:.+-]+:`([^`<]*?)\s*<[^`>]*>`")   # :ref:`text <target>` -> text
_ROLE = re.compile(r":[\w:.+-]+:`~?!?([^`]*)`")                       # :func:`f` -> f
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")                       # `text <url>`_ -> text
_LITERAL = re.compile(r"``([^`]+)``")
_INTERPRETED = re.compile(r"`([^`]+)`_{0,2}")
_STRONG = re.compile(r"\*\*([^*]+)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])")
_SUBSTITUTION = re.compile(r"\|([\w -]+)\|_?")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _inline(line: str) -> str:
    line = _ROLE_WITH_TARGET.sub(r"\1", line)
    line = _ROLE.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    line = _LITERAL.sub(r"\1", line)
    line = _INTERPRETED.sub(r"\1", line)
    line = _STRONG.sub(r"\1", line)
    line = _EMPHASIS.sub(r"\1", line)
    line = _SUBSTITUTION.sub(r"\1", line)
    if line.rstrip().endswith("::"):  # "example::" introduces a literal block: keep one colon
        line = line.rstrip()[:-1]
        line = line[:-1].rstrip() if line.endswith(" :") else line
    return line


def rest_to_text(source: str) -> str:
    lines = source.replace("\r\n", "\n").replace("\t", "        ").split("\n")
    out: list[str] = []
    skip_deeper_than: int | None = None  # drop lines indented more than this (a dropped block's body)
    for line in lines:
        if skip_deeper_than is not None:
            if not line.strip() or _indent(line) > skip_deeper_than:
                continue
            skip_deeper_than = None
        directive = _DIRECTIVE.match(line)
        if directive:
            indent, name, argument = len(directive.group(1)), directive.group(2), directive.group(3)
            if name in _DROP_WITH_BODY:
                skip_deeper_than = indent
            elif _KEEP_SIGNATURE.match(name) and argument:
                out.append(" " * indent + _inline(argument))
            elif argument and name in {"note", "warning", "seealso", "attention", "important", "hint", "tip",
                                       "caution", "danger", "rubric", "versionadded", "versionchanged",
                                       "deprecated", "admonition", "topic", "sidebar"}:
                out.append(" " * indent + _inline(argument))
            continue
        if _COMMENT_OR_TARGET.match(line):
            skip_deeper_than = _indent(line)  # a comment's body is indented under it
            continue
        if _SECTION_RULE.match(line):
            continue
        if _FIELD_OPTION.match(line) and out and _DIRECTIVE.match(out[-1] or ""):
            continue
        out.append(_inline(line).rstrip())
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")
