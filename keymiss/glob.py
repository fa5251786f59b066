"""Redis ``KEYS``/``SCAN MATCH`` glob patterns.

Python's ``fnmatch`` differs from Redis (``[!a]`` instead of ``[^a]``, no backslash escapes), so a
pattern copied from a Redis deployment would silently match other keys. This follows Redis's
``stringmatchlen``: ``*``, ``?``, ``[abc]``, ``[^a]``, ``[a-z]`` and ``\\`` escapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache


def glob_to_regex(pattern: str) -> str:
    """Translate a Redis glob into an anchored regular expression."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            while i + 1 < n and pattern[i + 1] == "*":
                i += 1
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            j = i + 1
            negate = j < n and pattern[j] == "^"
            if negate:
                j += 1
            parts: list[str] = []
            while j < n and pattern[j] != "]":
                if pattern[j] == "\\" and j + 1 < n:
                    parts.append(re.escape(pattern[j + 1]))
                    j += 2
                elif j + 2 < n and pattern[j + 1] == "-":  # as Redis: in [a-], "]" ends the range
                    lo, hi = sorted((pattern[j], pattern[j + 2]))
                    parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
                    j += 3
                else:
                    parts.append(re.escape(pattern[j]))
                    j += 1
            # Redis treats an unterminated class as running to the end of the pattern.
            body = "".join(parts)
            if not body:
                out.append("[^\\s\\S]" if not negate else "[\\s\\S]")
            else:
                out.append(f"[{'^' if negate else ''}{body}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "(?s:" + "".join(out) + r")\Z"


@lru_cache(maxsize=256)
def compile_glob(pattern: str) -> Callable[[str], bool]:
    """A fast ``key -> bool`` matcher; ``*`` alone and literal patterns skip the regex engine."""
    if pattern == "*":
        return lambda key: True
    if not any(ch in pattern for ch in "*?[\\"):
        return pattern.__eq__
    if pattern.endswith("*") and not any(ch in pattern[:-1] for ch in "*?[\\"):
        return lambda key, p=pattern[:-1]: key.startswith(p)  # type: ignore[misc]
    # Redis matches bytes: "?" is one byte of a UTF-8 key, not one character. Keys and patterns
    # that are not ASCII are matched in a one-character-per-byte view of their bytes.
    rx = re.compile(_linear_regex(pattern if pattern.isascii() else _bytes_view(pattern)))
    return lambda key: rx.match(key if key.isascii() else _bytes_view(key)) is not None


def _linear_regex(pattern: str) -> str:
    """The glob as a regex that never backtracks across a ``*``: ``*a*a*b`` translated as
    ``.*a.*a.*b`` takes time exponential in its stars on a key of ``a``s. Between two stars the
    glob is a run of one-character matchers, and the leftmost place that run fits is always a
    right choice (a later one leaves fewer characters to the rest), so each middle run is an atomic
    ``(?>.*?run)`` and matching costs at most pattern length x key length."""
    runs: list[list[str]] = [[]]
    for piece in _pieces(pattern):
        if piece == ".*":  # glob_to_regex made each run of stars one
            runs.append([])
        else:
            runs[-1].append(piece)
    if len(runs) == 1:
        return "(?s:" + "".join(runs[0]) + r")\Z"
    head, middle, tail = runs[0], runs[1:-1], runs[-1]
    out = "".join(head) + "".join("(?>.*?" + "".join(run) + ")" for run in middle)
    return "(?s:" + out + ".*" + "".join(tail) + r")\Z"


def _pieces(pattern: str) -> list[str]:
    """The glob's regex as pieces: ``.*`` for a star, else one piece per character it matches."""
    return re.findall(r"\.\*|\[(?:\\.|[^\]\\])*\]|\\.|\.|[^.]", glob_to_regex(pattern)[4:-3], re.S)


def _bytes_view(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def glob_prefix(pattern: str) -> str:
    """The literal text every matching key starts with (used to route keys quickly)."""
    for i, ch in enumerate(pattern):
        if ch in "*?[\\":
            return pattern[:i]
    return pattern


def _tokens(pattern: str) -> list[re.Pattern[str] | None]:
    """The glob as a list of one-character matchers, ``None`` standing for ``*``."""
    out: list[re.Pattern[str] | None] = []
    for piece in _pieces(pattern):
        out.append(None if piece == ".*" else re.compile(piece, re.S))
    return out


def can_start_with(pattern: str, prefix: str) -> bool:
    """Whether some key that starts with ``prefix`` matches the glob ``pattern``: two keyspaces
    whose keys may meet are told apart at registration, not by the order they were added in."""
    if not pattern.isascii() or not prefix.isascii():
        pattern, prefix = _bytes_view(pattern), _bytes_view(prefix)
    tokens = _tokens(pattern)

    def closure(states: set[int]) -> set[int]:
        todo = list(states)
        while todo:
            i = todo.pop()
            if i < len(tokens) and tokens[i] is None and i + 1 not in states:
                states.add(i + 1)
                todo.append(i + 1)
        return states

    states = closure({0})
    for ch in prefix:
        nxt: set[int] = set()
        for i in states:
            if i < len(tokens):
                tok = tokens[i]
                if tok is None:
                    nxt.add(i)
                elif tok.fullmatch(ch):
                    nxt.add(i + 1)
        states = closure(nxt)
        if not states:
            return False
    # a class matching nothing ([]) left in the rest would make the glob match no key: still
    # counted as a meeting, the safe side for a refusal
    return bool(states)
