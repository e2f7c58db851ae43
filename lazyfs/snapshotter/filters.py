"""containerd's snapshot filters, the part a snapshotter is asked for. Pure, no I/O.

containerd's syntax (its filters package): a request carries filters, any of which may match;
a filter is clauses joined by ',', all of which must match; a clause is ``FIELD==VALUE`` or
``FIELD!=VALUE`` (VALUE bare or double-quoted), FIELD one of ``name``, ``parent``, ``kind`` or
``labels.KEY`` (KEY bare or double-quoted). containerd checks what a walk returns itself
(metadata/snapshot.go: "Walk did not respect filter"), so a clause this module does not know
(``~=``, a bare field) matches everything: the answer may hold more, never fewer, snapshots.
"""
from __future__ import annotations

import re

from lazyfs.snapshotter.meta import KIND_NAMES, Info

_CLAUSE = re.compile(r'^\s*(name|parent|kind|labels\.(?:"(?:[^"\\]|\\.)*"|[^=!~,"]+))\s*(==|!=)\s*'
                     r'("(?:[^"\\]|\\.)*"|[^,]*?)\s*$')


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _split(filter_text: str) -> list[str]:
    """Clauses of one filter: commas split, except inside double quotes."""
    return [c for c in re.findall(r'(?:"(?:[^"\\]|\\.)*"|[^,"])+', filter_text) if c.strip()]


def _field(info: Info, name: str) -> str | None:
    if name == "name":
        return info.name
    if name == "parent":
        return info.parent
    if name == "kind":
        return KIND_NAMES.get(info.kind, "unknown")
    return info.labels.get(_unquote(name[len("labels."):]))


def _clause(info: Info, clause: str) -> bool:
    m = _CLAUSE.match(clause)
    if not m:
        return True  # not a clause this module knows: containerd checks the answer itself
    got, want = _field(info, m.group(1)), _unquote(m.group(3))
    return (got == want) if m.group(2) == "==" else (got != want)


def matches(info: Info, filters: list[str]) -> bool:
    if not filters:
        return True
    return any(all(_clause(info, c) for c in _split(f)) for f in filters)
