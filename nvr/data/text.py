"""Text helpers shared by loading, mining and training: one definition of a passage and of text identity."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


def passage_text(title: str | None, text: str | None) -> str:
    """The text a model sees for a document: ``"title text"`` (BEIR convention); either part may be empty."""
    title = (title or "").strip()
    text = (text or "").strip()
    if title and text:
        return f"{title} {text}"
    return title or text


def normalize_text(s: str) -> str:
    """NFKC + casefold + collapsed whitespace, so trivially different copies of a text compare equal."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", s).casefold()).strip()


def text_key(s: str) -> str:
    """Identity of a text for duplicate detection: sha1 hex of its normalized form."""
    return hashlib.sha1(normalize_text(s).encode("utf-8")).hexdigest()
