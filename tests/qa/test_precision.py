"""OpenVINO's bf16 span reader: what runs in float32, the settle margin that follows, padded widths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from keymiss.qa.reader import QAParams, SpanReader

from .conftest import SHORT_CONTEXT, long_context

pytest.importorskip("openvino")

QUESTIONS = [
    "Who performs viral transmission among adults?",
    "What does the receptor bind?",
    "How does the virus spread?",
    "Which response do children show?",
]


def _bf16_cpu() -> bool:
    from keymiss.qa.models import BF16_CPU_FLAGS, cpu_flags

    return bool(cpu_flags() & set(BF16_CPU_FLAGS))


needs_bf16 = pytest.mark.skipif(not _bf16_cpu(), reason="this CPU has no bf16 instructions")


@needs_bf16
def test_the_bf16_graph_keeps_its_residual_stream_in_float32_and_settles_fewer_calls(
    tiny_model: str, tmp_path: Path
) -> None:
    """The graph's float32 marks hold only in a graph read from IR: the reader's graph (cached or
    not) is one, and its narrower settle margin is chosen from what OpenVINO compiled."""
    from keymiss.qa import graph
    from keymiss.qa.backends import BF16_MARGIN, STREAM_MARGIN, load_openvino_qa_model
    from keymiss.qa.models import fingerprint

    read, mapped = graph.load_graph(tiny_model, fingerprint(tiny_model), "span", str(tmp_path))
    assert graph.Compiled(read, "bf16", mapped).float32_stream()
    assert graph.Compiled(read, "f32", mapped).float32_stream()  # float32 throughout
    built = graph.build_bert(tiny_model, "span")  # never read back: every node in bfloat16
    assert not graph.Compiled(built, "bf16", mapped).float32_stream()
    model = load_openvino_qa_model(tiny_model, dtype="bf16", cache=str(tmp_path))
    assert model.settle_margin == STREAM_MARGIN < BF16_MARGIN


@needs_bf16
def test_an_unwritable_graph_cache_still_reads_the_graph_back(tiny_model: str, tmp_path: Path) -> None:
    """A cache that cannot be written (here a file where its directory should be) costs a build per
    start, and the graph built is still read back from IR, so its float32 marks hold."""
    from keymiss.qa.backends import STREAM_MARGIN, load_openvino_qa_model

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    model = load_openvino_qa_model(tiny_model, dtype="bf16", cache=str(blocked))
    assert model.settle_margin == STREAM_MARGIN
    reader = SpanReader(model)  # type: ignore[arg-type]
    rec = reader.prepare("k:{t}:1", SHORT_CONTEXT)
    assert all(reader.answer([(q, rec) for q in QUESTIONS]))


def test_pass_widths_are_padded_and_answers_do_not_move(tiny_model: str, tmp_path: Path) -> None:
    from keymiss.qa.backends import load_openvino_qa_model

    model = load_openvino_qa_model(tiny_model, dtype="float32", cache=str(tmp_path))
    widths: list[int] = []
    forward = model.forward

    def recording(ids: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        widths.append(ids.shape[1])
        return forward(ids, *args, **kwargs)

    model.forward = recording  # type: ignore[method-assign]
    context = long_context(30)
    answers = {}
    for pad in (1, 16, 0):  # 0 is taken as no padding, not a division by zero
        widths.clear()
        reader = SpanReader(model, QAParams(pad_to=pad))  # type: ignore[arg-type]
        rec = reader.prepare("k:{t}:1", context)
        answers[pad] = reader.answer([(q, rec) for q in QUESTIONS])
        if pad == 16:
            assert widths and all(w % 16 == 0 or w == reader.params.max_seq_len for w in widths)
    assert answers[16] == answers[1] == answers[0]


def test_the_span_ranking_is_the_full_sorts_on_ties_zeros_and_nan() -> None:
    """Only cells scoring at least the k-th largest are sorted: the first k must still be exactly
    the full (score descending, flat position) sort's, ties and score-0 fill-ins included."""
    from keymiss.qa import reader

    rng = np.random.default_rng(1)
    for trial in range(600):
        n, k = int(rng.integers(1, 400)), int(rng.integers(1, 20))
        scores = [
            rng.random(n),
            rng.integers(0, 4, n),  # many ties
            np.zeros(n),  # mostly zeros: the zero cells fill in
            rng.random(n),
        ][trial % 4].astype(np.float32)
        if trial % 4 == 2:
            scores[rng.integers(0, n, 3)] = rng.random(3)
        if trial % 4 == 3:
            scores[rng.integers(0, n, 2)] = np.nan
        flat = rng.permutation(n * 3)[:n]
        want = np.lexsort((flat, -scores))[:k]
        assert np.array_equal(reader._top(scores, flat, k), want), (trial, want)


def test_padding_keys_stay_masked_however_far_attention_scores_spread(tmp_path: Path) -> None:
    """A checkpoint whose attention scores span more than 10000 (query and key weights scaled up
    here): a -10000 bias let padding keys through, so float32 logits depended on the batch's
    padding and left torch's. Masked as transformers masks, a padded row scores as it does alone."""
    torch = pytest.importorskip("torch")
    from transformers import BertForQuestionAnswering

    from keymiss.qa.backends import load_openvino_qa_model
    from keymiss.qa.models import load_qa_model

    from .conftest import build_checkpoint

    path = build_checkpoint(tmp_path / "model", seed=0)
    spread = BertForQuestionAnswering.from_pretrained(path)
    with torch.no_grad():
        for name, weight in spread.named_parameters():
            if ".query." in name or ".key." in name:
                weight.mul_(1000.0)
    spread.save_pretrained(path)
    ours = load_openvino_qa_model(path, dtype="float32", cache=str(tmp_path / "cache"))
    theirs = load_qa_model(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, (2, 40))
    mask = np.ones((2, 40), dtype=np.int64)
    mask[0, 9:] = ids[0, 9:] = 0  # row 0: 9 tokens, then padding
    types = np.zeros((2, 40), dtype=np.int64)
    types[:, 4:] = mask[:, 4:]
    alone = ours.forward(ids[:1, :9], types[:1, :9], mask[:1, :9])
    batched = ours.forward(ids, types, mask)
    reference = theirs.forward(ids, types, mask)
    for a, b, want in zip(alone, batched, reference, strict=True):
        np.testing.assert_allclose(b[0, :9], a[0], atol=1e-4)
        np.testing.assert_allclose(b[mask == 1], want[mask == 1], atol=1e-4)
