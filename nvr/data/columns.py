"""Which column of a pairs or corpus file holds which field.

Precedence, per field: an explicit mapping (``data.columns`` / ``data.corpus_columns``) > nvr's own column names >
sentence-transformers and other common names (``anchor``/``positive``/``negative``, ``question``/``answer``, ...),
used only when unambiguous (two candidate columns for one field is an error that names both). Columns that feed no
field are ignored; a ``label`` / ``score`` column is ignored with a warning, since every row is read as relevant.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nvr.utils.errors import ConfigError, InputError

log = logging.getLogger(__name__)

_LABEL_COLUMNS = ("label", "labels", "score", "scores", "relevance")


@dataclass(frozen=True)
class Role:
    """One field nvr reads, the column names that hold it, and how many columns may feed it."""

    name: str
    native: tuple[str, ...]
    """nvr's own names: always used when present (all of them)."""
    aliases: tuple[str, ...] = ()
    pattern: str | None = None
    """Regex (full match) for numbered alias columns, e.g. ``negative_1``."""
    many: bool = False
    """Several columns may feed this field (their values are unioned); else exactly one column."""
    detect_all: bool = False
    """Every matching column feeds the field (nvr's names and numbered aliases alike) instead of refusing several."""
    group: str | None = None
    """Required group: a file must have a column for at least one role of each group."""

    def is_alias(self, column: str) -> bool:
        return column in self.aliases or (self.pattern is not None and re.fullmatch(self.pattern, column) is not None)


PAIR_ROLES: tuple[Role, ...] = (
    Role("query_id", ("query_id",), ("qid", "query-id")),
    Role("query", ("query",), ("anchor", "question"), group="query"),
    Role("positive", ("positive", "positives"), ("pos", "answer", "passage", "document", "text", "context"),
         many=True, group="positive"),
    Role("positive_ids", ("positive_ids",), ("positive_id", "pos_ids", "corpus_id", "corpus-id", "doc_id"),
         many=True, group="positive"),
    Role("negative", ("negative", "negatives"), ("neg", "hard_negative", "hard_negatives"),
         pattern=r"negative_?[0-9]+", many=True, detect_all=True),
)
"""Fields of a pairs file: ``positive`` holds texts, ``positive_ids`` corpus ids; ``negative`` texts are given hard
negatives (added to the corpus as mining candidates)."""

CORPUS_ROLES: tuple[Role, ...] = (
    Role("id", ("_id",), ("id", "doc_id", "docid", "corpus_id", "corpus-id", "pid", "passage_id")),
    Role("title", ("title",)),
    Role("text", ("text",), ("passage", "document", "content", "contents", "body", "sentence"), group="text"),
)
"""Fields of a corpus file (BEIR names first); without an id column, ids are derived from each passage's content."""


def check_mapping(
    mapping: Mapping[str, str | list[str]] | None, roles: Sequence[Role], key: str
) -> dict[str, tuple[str, ...]]:
    """Validate an explicit mapping (field -> column or list of columns) from a config; ``ConfigError`` names the
    offending key (``data.columns.query``). Returns field -> tuple of columns."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(key, f"must map fields to column names, got {type(mapping).__name__}")
    by_name = {r.name: r for r in roles}
    out: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for field, value in mapping.items():
        if field not in by_name:
            raise ConfigError(f"{key}.{field}", f"unknown field; one of: {', '.join(by_name)}")
        cols = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
        if not cols or not all(isinstance(c, str) and c for c in cols):
            raise ConfigError(f"{key}.{field}", f"must be a column name (or a list of them), got {value!r}")
        if len(cols) > 1 and not by_name[field].many:
            raise ConfigError(f"{key}.{field}", f"takes one column, got {list(cols)}")
        for col in cols:
            if col in owner and owner[col] != field:
                raise ConfigError(f"{key}.{field}", f"column {col!r} is already mapped to {key}.{owner[col]}")
            owner[col] = field
        out[field] = tuple(dict.fromkeys(cols))
    return out


def resolve_columns(
    roles: Sequence[Role], found: Sequence[str], explicit: Mapping[str, tuple[str, ...]], *, path: Path, key: str,
    fixed: bool, line: int | None = None,
) -> dict[str, tuple[str, ...]]:
    """Field -> the columns to read it from, given the columns ``found`` in the file.

    ``fixed``: every row has exactly ``found`` (header / schema): mapped columns must exist and every required
    group must be covered. Otherwise (JSON Lines, ``found`` = the first row's keys) nvr's own names are read on
    every row, so rows may mix them. ``InputError`` (naming the file, and ``line`` for JSON Lines) for an
    ambiguous, missing or unknown column, listing the columns found.
    """
    taken = {c for cols in explicit.values() for c in cols}
    natives = {c for r in roles for c in r.native}
    out: dict[str, tuple[str, ...]] = {}
    for role in roles:
        if role.name in explicit:
            cols = explicit[role.name]
            missing = [c for c in cols if c not in found]
            if fixed and missing:
                raise InputError(f"column {missing[0]!r} of {key}.{role.name} is not in the file; columns found: "
                                 f"{_listing(found)}", path, line)
            out[role.name] = cols
            continue
        own = tuple(c for c in role.native if c not in taken)
        present = tuple(c for c in own if c in found)
        aliases = tuple(c for c in found if c not in taken and c not in natives and role.is_alias(c))
        if present and not role.detect_all:
            out[role.name] = present if fixed else own
            continue
        if len(aliases) > 1 and not role.detect_all:
            raise InputError(f"columns {_listing(aliases)} could each be the {role.name}; set {key}.{role.name} to "
                             f"one of them (columns found: {_listing(found)})", path, line)
        out[role.name] = (present if fixed else own) + aliases
    if fixed:
        _check_groups(roles, out, found, path, key, line)
    return out


def describe(mapping: Mapping[str, tuple[str, ...]], found: Sequence[str]) -> str:
    """``query <- 'anchor', positive <- 'pos'; ignored: 'label'`` for logs."""
    used = [f"{f} <- {_listing(c)}" for f, c in mapping.items() if c]
    ignored = [c for c in found if not any(c in cols for cols in mapping.values())]
    return ", ".join(used) + (f"; ignored: {_listing(ignored)}" if ignored else "")


def warn_ignored_labels(mapping: Mapping[str, tuple[str, ...]], found: Sequence[str], path: Path) -> None:
    """A label / score column usually marks some rows as not relevant; nvr reads every row as a positive pair."""
    used = {c for cols in mapping.values() for c in cols}
    for col in found:
        if col not in used and col.lower() in _LABEL_COLUMNS:
            log.warning("%s: column %r is ignored: every row is read as a relevant (query, positive) pair, so drop "
                        "non-relevant rows first", path, col)


def _check_groups(roles: Sequence[Role], out: Mapping[str, tuple[str, ...]], found: Sequence[str], path: Path,
                  key: str, line: int | None) -> None:
    groups: dict[str, list[Role]] = {}
    for role in roles:
        if role.group is not None:
            groups.setdefault(role.group, []).append(role)
    for group, members in groups.items():
        if any(out[r.name] for r in members):
            continue
        names = [n for r in members for n in (*r.native, *r.aliases)]
        fields = " or ".join(f"{key}.{r.name}" for r in members)
        raise InputError(f"no {group} column (looked for {_listing(names)}); set {fields} to one of the columns "
                         f"found: {_listing(found)}", path, line)


def _listing(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "none"
