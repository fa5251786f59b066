"""Contexts, tokenised once and stored beside their answers.

A context is stored under ``keymiss:ctx:<context key>``. The context key carries the hash tag
(``PMC302072.xml:{8YG}:10``), so on Redis Cluster the context and every answer about it share one
slot. The record is JSON (readable from any client, never pickled): the original text, its token
ids, character offsets and word ids for the reader's tokenizer, that tokenizer's fingerprint, and
for the sentence reader the sentence spans and their embeddings.

Windows are cut at question time, not at ingest: how many context tokens fit beside a question
depends on the question's length, and cutting them the way the tokenizer's overflow does is what
makes answers identical to ``pipeline("question-answering")``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keymiss.errors import CodecError, KeyspaceError

log = logging.getLogger("keymiss.qa")

CONTEXT_PREFIX = "keymiss:ctx:"
RECORD_VERSION = 1


class UnknownContextError(KeyspaceError):
    """The question names a context that was never ingested."""


def hash_tag(key: str) -> str | None:
    """Redis Cluster's hash tag of a key: what lies between the first ``{`` and the first ``}``
    after it, when that is not empty."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


def context_store_key(context_key: str) -> str:
    """Where a context's record lives (same hash tag as the context key)."""
    return CONTEXT_PREFIX + context_key


def _pack(arr: np.ndarray) -> dict[str, Any]:
    arr = np.ascontiguousarray(arr)
    return {"dtype": arr.dtype.str, "shape": list(arr.shape), "b64": base64.b64encode(arr.tobytes()).decode()}


def _unpack(obj: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(obj["dtype"])
    if dtype.hasobject:
        raise CodecError("refusing an object array in a context record")
    return np.frombuffer(base64.b64decode(obj["b64"]), dtype=dtype).reshape(obj["shape"])


@dataclass
class ContextRecord:
    """One tokenised context."""

    key: str
    text: str
    tokenizer: str  # fingerprint of the tokenizer that produced ids/offsets/words
    ids: np.ndarray  # int32 (n,)
    offsets: np.ndarray  # int32 (n, 2), character spans in ``text``
    words: np.ndarray  # int32 (n,), word index of each token (-1: none)
    sentences: list[tuple[int, int]] = field(default_factory=list)
    embeddings: np.ndarray | None = None  # float32 (n_sentences, dim), sentence reader only
    encoder: str | None = None  # fingerprint of the encoder that made ``embeddings``

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "v": RECORD_VERSION,
            "key": self.key,
            "text": self.text,
            "tokenizer": self.tokenizer,
            "ids": _pack(self.ids.astype("<i4")),
            "offsets": _pack(self.offsets.astype("<i4")),
            "words": _pack(self.words.astype("<i4")),
            "sentences": [list(s) for s in self.sentences],
        }
        if self.embeddings is not None:
            doc["embeddings"] = _pack(self.embeddings.astype("<f4"))
            doc["encoder"] = self.encoder
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ContextRecord:
        try:
            doc = json.loads(data)
            if doc.get("v") != RECORD_VERSION:
                raise CodecError(f"context record version {doc.get('v')!r} is not {RECORD_VERSION}")
            rec = cls(
                key=doc["key"],
                text=doc["text"],
                tokenizer=doc["tokenizer"],
                ids=_unpack(doc["ids"]),
                offsets=_unpack(doc["offsets"]),
                words=_unpack(doc["words"]),
                sentences=[(int(a), int(b)) for a, b in doc.get("sentences", [])],
                embeddings=_unpack(doc["embeddings"]) if "embeddings" in doc else None,
                encoder=doc.get("encoder"),
            )
        except CodecError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise CodecError(f"not a keymiss context record: {exc}") from exc
        if rec.offsets.shape != (len(rec.ids), 2) or rec.words.shape != rec.ids.shape:
            raise CodecError("context record arrays do not line up")
        return rec


def tokenize_context(tokenizer: Any, fingerprint: str, key: str, text: str) -> ContextRecord:
    """Token ids, offsets and word ids of ``text`` alone (BERT tokenises word by word, so these are
    exactly the context's tokens inside a question–context pair)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int32).reshape(-1, 2)
    words = np.asarray([-1 if w is None else w for w in enc.word_ids()], dtype=np.int32)
    return ContextRecord(key, text, fingerprint, ids, offsets, words)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of sentences (ends at ``.``, ``!`` or ``?`` followed by whitespace)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        if text[start : m.start()].strip():
            spans.append((start, m.start()))
        start = m.end()
    if text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return spans


def read_corpus(path: str) -> Iterator[tuple[str, str]]:
    """(context key, text) pairs from JSON lines (``{"key": …, "text": …}``) or plain text, one
    paragraph per line (keys ``<file>:{<tag>}:<line>``, one hash tag per file)."""
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        if path.endswith((".jsonl", ".json")):
            seen: dict[str, int] = {}
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    key, text = str(doc["key"]), str(doc["text"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f'{path}:{n}: expected {{"key": ..., "text": ...}}: {exc}') from exc
                if "_" in key:
                    raise ValueError(
                        f"{path}:{n}: context key {key!r} may not contain '_' (it separates key fields)"
                    )
                if not text.strip():
                    log.warning("%s:%d: context %r has an empty text; skipped", path, n, key)
                    continue
                if key in seen:
                    log.warning(
                        "%s:%d: context %r repeats line %d; the later text wins", path, n, key, seen[key]
                    )
                seen[key] = n
                yield key, text
        else:
            stem = re.sub(r"[_{}\s]", "-", name)
            tag = base64.b32encode(zlib.crc32(name.encode()).to_bytes(4, "big")).decode()[:3]
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield f"{stem}:{{{tag}}}:{n}", line.strip()
