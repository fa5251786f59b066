"""Readers: a question plus a stored context in, the answer text out, many at a time.

``SpanReader`` is extractive QA with any Hugging Face checkpoint. It reproduces the decisions of
``pipeline("question-answering")`` (transformers 5.2) — window cutting, masking, softmax per window,
the best span with end ≥ start and at most ``max_answer_len`` tokens among the top candidates,
word alignment, and merging equal answers across windows — without depending on the pipeline, and
runs every window of every question in the batch through one padded forward pass per chunk.

``SentenceReader`` is the offline default for checkpoints without a span head: it answers with the
context sentence whose embedding is closest to the question's.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from keymiss.errors import ConfigError
from keymiss.qa.contexts import ContextRecord, split_sentences, tokenize_context
from keymiss.qa.models import Encoder, QAModel

log = logging.getLogger("keymiss.qa")


#: torch's bf16 autocast keeps a float32 residual stream: a 4 % lead is enough to trust its answer
DEFAULT_SETTLE_MARGIN = 0.04


@dataclass(frozen=True)
class QAParams:
    """The pipeline's defaults, so one checkpoint gives one answer either way."""

    max_seq_len: int = 384
    doc_stride: int = 128
    max_answer_len: int = 15
    max_question_len: int = 64
    handle_impossible_answer: bool = False
    align_to_words: bool = True
    #: tokens per forward pass: a batch of 16 ~330-token windows in one pass (fewer, fuller passes)
    max_batch_tokens: int = 384 * 16
    #: a pass's width is padded up to a multiple of this (padding is masked, answers do not move):
    #: a graph runtime prepares kernels per input shape, and fewer shapes are met again sooner
    pad_to: int = 16
    #: with reduced precision, answers whose best and runner-up scores are closer than this
    #: (relative) are recomputed in float32: reduced-precision speed, full-precision decisions.
    #: None: the model's own (``settle_margin``; 0.04 for torch's bf16 autocast)
    verify_margin: float | None = None


@dataclass
class _Window:
    item: int
    start: int  # first context token of the window
    stop: int
    question: list[int]

    @property
    def length(self) -> int:
        return len(self.question) + (self.stop - self.start) + 3


def _word_spans(rec: ContextRecord) -> dict[int, tuple[int, int]]:
    """word id -> (first char, end char), what ``Encoding.word_to_chars`` answers."""
    spans: dict[int, tuple[int, int]] = {}
    for w, (a, b) in zip(rec.words.tolist(), rec.offsets.tolist(), strict=True):
        if w < 0:
            continue
        if w in spans:
            spans[w] = (spans[w][0], b)
        else:
            spans[w] = (a, b)
    return spans


@functools.lru_cache(maxsize=64)
def _band(n: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns and flat positions of the band's cells, diagonal by diagonal: the same for
    every window of ``n`` tokens, so built once per length (read-only: they are shared)."""
    rows = np.concatenate([np.arange(n - d) for d in range(width)])
    cols = np.concatenate([np.arange(d, n) for d in range(width)])
    flat = rows * n + cols
    for a in (rows, cols, flat):
        a.setflags(write=False)
    return rows, cols, flat


def _top(scores: np.ndarray, flat_index: np.ndarray, topk: int) -> np.ndarray:
    """The first ``topk`` positions by (score descending, flat position): the same as sorting them
    all, but only the cells scoring at least the k-th largest score are sorted."""
    if scores.size > topk:
        cut = scores.size - topk
        kth = np.partition(scores, cut)[cut]
        chosen = np.flatnonzero(scores >= kth)
        if chosen.size >= topk:  # not when NaN scores make the comparison fail: sort them all
            return chosen[np.lexsort((flat_index[chosen], -scores[chosen]))][:topk]
    return np.lexsort((flat_index, -scores))[:topk]


def _decode_spans(
    start: np.ndarray, end: np.ndarray, topk: int, max_answer_len: int, undesired: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (start, end) pairs by start×end probability, end ≥ start, length ≤ max_answer_len.

    The pipeline builds the full n×n outer product and zeroes all but a band of ``max_answer_len``
    diagonals; only the band can win, so it is computed alone (each score is the same single float32
    product). The ranking is the pipeline's — by score, with candidates ordered as in its flattened
    matrix — and when fewer than ``topk`` band entries are positive, the zero entries fill in as
    ``np.argpartition`` would let them (they can only ever produce score-0 answers).
    """
    s, e = start[0], end[0]
    n = s.shape[0]
    rows, cols, flat_index = _band(n, min(max_answer_len, n))
    scores = s[rows] * e[cols]
    if topk == 1:
        best = int(np.argmax(scores))
        order = np.array([best]) if scores[best] > 0 else np.array([0])
    else:
        order = _top(scores, flat_index, topk)
    starts, ends = rows[order], cols[order]
    allowed = undesired.nonzero()  # a (rows, cols) pair, as the pipeline passes it to np.isin
    keep = np.isin(starts, allowed) & np.isin(ends, allowed)
    return starts[keep], ends[keep], scores[order][keep]


def _release(*models: Any) -> None:
    # OpenVINO models hand back the graph file's pages (``release``); torch models have nothing to
    for model in {id(m): m for m in models if m is not None}.values():
        release = getattr(model, "release", None)
        if release is not None:
            release()


class SpanReader:
    """Extractive QA over pre-tokenised contexts."""

    kind = "span"

    def __init__(
        self, model: QAModel, params: QAParams | None = None, *, verify: QAModel | None = None
    ) -> None:
        self.model = model
        # Who settles close calls: a float32 copy (bfloat16 weights), the same weights without
        # autocast, or nobody (float32 already decides exactly).
        self.verify = verify if verify is not None else (model if model.autocast else None)
        self.verified = 0  # answers recomputed in float32
        p = params or QAParams()
        limit = min(model.max_positions, int(getattr(model.tokenizer, "model_max_length", 512) or 512), 512)
        if p.max_seq_len > limit:
            log.warning(
                "max_seq_len %d exceeds the model's %d positions; using %d", p.max_seq_len, limit, limit
            )
            p = QAParams(**{**p.__dict__, "max_seq_len": limit})
        if p.max_seq_len < 4:  # [CLS] question [SEP] context [SEP]: not one context token fits
            raise ConfigError(f"max_seq_len {p.max_seq_len} leaves no room for the context")
        self.params = p
        # a question takes at most half of a window (a short window, not the default 384, makes
        # this bite): a longer one would leave the context too little room, or none at all
        self.max_question_len = min(p.max_question_len, (p.max_seq_len - 3) // 2)
        own = getattr(model, "settle_margin", DEFAULT_SETTLE_MARGIN)
        self.margin = p.verify_margin if p.verify_margin is not None else own
        tok = model.tokenizer
        self.cls_id, self.sep_id, self.pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id or 0
        self.fingerprint = model.fingerprint
        self.tokenizer_fingerprint = model.tokenizer_fingerprint

    def prepare(self, key: str, text: str) -> ContextRecord:
        return tokenize_context(self.model.tokenizer, self.tokenizer_fingerprint, key, text)

    def current(self, rec: ContextRecord) -> bool:
        """Whether a stored record was made for this reader's tokenizer."""
        return rec.tokenizer == self.tokenizer_fingerprint

    def release(self) -> None:
        """Hand back memory that start-up work left resident (see ``QAService.settle``)."""
        _release(self.model, self.verify)

    def _windows(self, item: int, question: list[int], n: int) -> list[_Window]:
        p = self.params
        room = p.max_seq_len - len(question) - 3
        stride = p.doc_stride
        if stride >= room:  # the tokenizer refuses this; keep the overlap below the window
            stride = max(0, room // 2)
        out = []
        start = 0
        while True:
            out.append(_Window(item, start, min(start + room, n), question))
            if start + room >= n:
                return out
            start += room - stride

    def answer(self, items: list[tuple[str, ContextRecord]]) -> list[str]:
        """Answers for (question, context) pairs, in order."""
        if not items:
            return []
        tok = self.model.tokenizer
        encoded = tok([q for q, _ in items], add_special_tokens=False)["input_ids"]
        windows: list[_Window] = []
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_question_len:
                log.warning(
                    "question of %d tokens truncated to %d: %r",
                    len(ids),
                    self.max_question_len,
                    items[i][0][:80],
                )
                ids = ids[: self.max_question_len]
            windows.extend(self._windows(i, list(ids), len(items[i][1].ids)))
        logits = self._forward(windows, items, self.model)
        best = [self._best(i, rec, windows, logits) for i, (_, rec) in enumerate(items)]
        if self.verify is not None:
            close = [i for i, (_, margin) in enumerate(best) if margin < self.margin]
            if close:
                again = [w for w in windows if w.item in set(close)]
                logits_again = self._forward(again, items, self.verify, precise=True)
                for i in close:
                    best[i] = self._best(i, items[i][1], again, logits_again)
                self.verified += len(close)
        return [text for text, _ in best]

    def _forward(
        self,
        windows: list[_Window],
        items: list[tuple[str, ContextRecord]],
        model: QAModel,
        *,
        precise: bool = False,
    ) -> list[Any]:
        """Start/end logits per window; windows sorted by length and padded per chunk."""
        order = sorted(range(len(windows)), key=lambda w: windows[w].length)
        out: list[Any] = [None] * len(windows)
        chunk: list[int] = []

        def run(chunk: list[int]) -> None:
            width = windows[chunk[-1]].length
            pad = max(1, self.params.pad_to)
            width = min(-(-width // pad) * pad, max(width, self.params.max_seq_len))
            ids = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
            types = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, w in enumerate(chunk):
                win = windows[w]
                ctx = items[win.item][1].ids[win.start : win.stop]
                q = win.question
                seq = [self.cls_id, *q, self.sep_id, *ctx.tolist(), self.sep_id]
                ids[row, : len(seq)] = seq
                types[row, len(q) + 2 : len(seq)] = 1
                mask[row, : len(seq)] = 1
            start, end = model.forward(ids, types, mask, precise=precise)
            for row, w in enumerate(chunk):
                n = windows[w].length
                out[w] = (start[row, :n], end[row, :n])

        for w in order:
            if chunk and windows[w].length * (len(chunk) + 1) > self.params.max_batch_tokens:
                run(chunk)
                chunk = []
            chunk.append(w)
        if chunk:
            run(chunk)
        return out

    def _best(
        self, item: int, rec: ContextRecord, windows: list[_Window], logits: list[Any]
    ) -> tuple[str, float]:
        """The answer text and its relative lead over the runner-up (1.0: no contest)."""
        p = self.params
        spans = _word_spans(rec) if p.align_to_words else {}
        words = rec.words
        offsets = rec.offsets
        answers: list[list[Any]] = []  # [score, text]
        min_null = 1000000.0
        pre_topk = 12 if p.align_to_words else 1
        for w, win in enumerate(windows):
            if win.item != item:
                continue
            start_logits, end_logits = logits[w]
            n = win.length
            first_ctx = len(win.question) + 2
            undesired = np.zeros((1, n), dtype=np.int64)
            undesired[0, first_ctx : n - 1] = 1
            undesired[0, 0] = 1  # CLS stays a candidate, as in the pipeline
            masked = undesired == 0
            start = np.where(masked, np.float32(-10000.0), start_logits[None].astype(np.float32))
            end = np.where(masked, np.float32(-10000.0), end_logits[None].astype(np.float32))
            start = np.exp(start - start.max(axis=-1, keepdims=True))
            start = start / start.sum()
            end = np.exp(end - end.max(axis=-1, keepdims=True))
            end = end / end.sum()
            if p.handle_impossible_answer:
                min_null = min(min_null, float(start[0, 0] * end[0, 0]))
            start[0, 0] = end[0, 0] = 0.0
            starts, ends, scores = _decode_spans(start, end, pre_topk, p.max_answer_len, undesired)
            for s, e, score in zip(starts.tolist(), ends.tolist(), scores.tolist(), strict=True):
                a, b = self._chars(s, e, win, first_ctx, words, offsets, spans)
                text = rec.text[a:b]
                low = text.lower()
                for ans in answers:
                    if ans[1].lower() == low:
                        ans[0] += score
                        break
                else:
                    answers.append([score, text])
        if p.handle_impossible_answer:
            answers.append([min_null, ""])
        answers.sort(key=lambda x: x[0], reverse=True)
        if not answers:
            return "", 1.0
        top = float(answers[0][0])
        lead = 1.0 if len(answers) < 2 or top <= 0 else (top - float(answers[1][0])) / top
        return str(answers[0][1]), lead

    @staticmethod
    def _chars(
        s: int,
        e: int,
        win: _Window,
        first_ctx: int,
        words: np.ndarray,
        offsets: np.ndarray,
        spans: dict[int, tuple[int, int]],
    ) -> tuple[int, int]:
        """Character span of tokens s..e of a window, aligned to whole words where possible."""
        if s < first_ctx or e < first_ctx:  # CLS: the pipeline falls back to its (0, 0) offsets
            return 0, 0
        cs, ce = win.start + s - first_ctx, win.start + e - first_ctx
        if spans:
            ws, we = int(words[cs]), int(words[ce])
            if ws >= 0 and we >= 0:
                return spans[ws][0], spans[we][1]
        return int(offsets[cs][0]), int(offsets[ce][1])


class SentenceReader:
    """Answers with the best-matching sentence of the context (for encoders without a span head)."""

    kind = "sentence"

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.fingerprint = encoder.fingerprint
        self.tokenizer_fingerprint = encoder.tokenizer_fingerprint

    def prepare(self, key: str, text: str) -> ContextRecord:
        rec = tokenize_context(self.encoder.tokenizer, self.tokenizer_fingerprint, key, text)
        rec.sentences = split_sentences(text) or [(0, len(text))]
        rec.embeddings = self.encoder.embed([text[a:b] for a, b in rec.sentences])
        rec.encoder = self.encoder.fingerprint
        return rec

    def current(self, rec: ContextRecord) -> bool:
        return rec.encoder == self.encoder.fingerprint and rec.embeddings is not None

    def release(self) -> None:
        """Hand back memory that start-up work left resident (see ``QAService.settle``)."""
        _release(self.encoder)

    def answer(self, items: list[tuple[str, ContextRecord]]) -> list[str]:
        if not items:
            return []
        questions = self.encoder.embed([q for q, _ in items])
        out = []
        for qv, (_, rec) in zip(questions, items, strict=True):
            assert rec.embeddings is not None
            best = int(np.argmax(rec.embeddings @ qv))
            a, b = rec.sentences[best]
            out.append(rec.text[a:b])
        return out


Reader = SpanReader | SentenceReader
