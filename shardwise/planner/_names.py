"""Name lookup with helpful errors: closest catalog names via difflib."""
from __future__ import annotations

import difflib
from typing import Iterable, Mapping, TypeVar

T = TypeVar("T")


def closest(name: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` catalog names most similar to ``name`` (difflib ratio, cutoff 0.4)."""
    names = sorted(set(names))
    hits = difflib.get_close_matches(name.lower(), names, n=n, cutoff=0.4)
    if not hits:  # fall back to a shared prefix, e.g. "llama" -> llama-2-7b ...
        hits = [x for x in names if x.startswith(name.lower()[:4])][:n]
    return hits


def lookup(kind: str, name: str, table: Mapping[str, T], aliases: Mapping[str, str]) -> T:
    """Find ``name`` (case-insensitive, aliases allowed) or raise ValueError naming the closest ids."""
    key = name.strip().lower()
    key = aliases.get(key, key)
    if key in table:
        return table[key]
    sugg = closest(key, list(table) + list(aliases))
    hint = f"; closest: {', '.join(sugg)}" if sugg else ""
    raise ValueError(f"unknown {kind} {name!r}{hint} (see `shardwise plan --list`)")
