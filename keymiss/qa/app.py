"""The ``bertqa{<tag>}_<context>_<question>`` keyspace: wiring contexts, readers and the engine."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from keymiss.api import Keymiss
from keymiss.engine.handlers import HandlerThreads
from keymiss.errors import CodecError
from keymiss.qa.contexts import ContextRecord, UnknownContextError, context_store_key, hash_tag, read_corpus
from keymiss.qa.footprint import page_out_libraries, trim_heap
from keymiss.qa.progress import StartProgress
from keymiss.qa.reader import QAParams, Reader, SentenceReader, SpanReader

log = logging.getLogger("keymiss.qa")

QA_PATTERN = "bertqa{<tag>}_<context>_<question>"
MODEL_KEY = "keymiss:model:bertqa"
DEMO_CORPUS = os.path.join(os.path.dirname(__file__), "data", "demo_corpus.jsonl")


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def answers_pattern(context_key: str) -> str:
    """Glob matching every cached answer about one context."""
    return f"bertqa{{*}}_{_glob_escape(context_key)}_*"


async def forget_answers(km: Keymiss, pattern: str) -> int:
    """Forget the cached answers matching ``pattern``. ``keymiss ingest`` runs without the
    ``bertqa`` keyspace (the serving app's), which ``km.forget`` needs to know the keys are
    answers: there they are found through the store itself."""
    if km.registry.get(QA_PATTERN) is not None:
        return await km.forget(pattern)
    keys, cursor = [], 0
    while True:
        cursor, chunk = await km.store.scan(cursor, pattern, 1000)
        keys.extend(chunk)
        if cursor == 0:
            return await km.store.delete(keys) if keys else 0


@dataclass
class IngestReport:
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    forgotten_answers: int = 0


class QAService:
    """Holds the reader (loaded at start, off the event loop) and runs it on one model thread."""

    def __init__(self, make_reader: Callable[[], Reader]) -> None:
        self._make_reader = make_reader
        self.reader: Reader | None = None
        # One forward pass at a time: batches that wait here grow instead of fighting for 2 cores.
        # A daemon thread: a model stuck in a forward pass cannot keep the process from exiting.
        self._model_thread = HandlerThreads("model", 1)
        #: how many times ``settle`` handed memory back (after start-up, after each ingest)
        self.settled = 0
        #: bytes of library mappings the last ``settle`` advised the kernel to page out
        self.paged_out = 0

    async def load(self) -> Reader:
        if self.reader is None:
            self.reader = await self.run(self._make_reader)
        return self.reader

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self._model_thread.submit(functools.partial(fn, *args)))

    async def settle(self) -> None:
        """Once start-up work is done (the reader loaded, contexts ingested): the reader hands
        back the graph file's pages its first forward passes read, the C heap what loading,
        compiling and ingesting freed, and OpenVINO's libraries the clean pages of code that only
        reading and compiling ran (``keymiss.qa.footprint``). On the model thread, between
        forward passes; the reader keeps serving as before (code a pass needs faults back in)."""
        if self.reader is None:
            return
        reader = self.reader

        def settle() -> int:
            reader.release()
            trim_heap()
            return page_out_libraries()

        self.paged_out = await self.run(settle)
        self.settled += 1

    async def ingest(
        self,
        km: Keymiss,
        pairs: Iterable[tuple[str, str]],
        progress: Callable[[int], None] | None = None,
        batch_size: int = 64,
    ) -> IngestReport:
        """Store each context's tokens (idempotent); a changed context forgets its cached answers.
        Contexts go ``batch_size`` at a time (``progress`` hears of each batch)."""
        reader = await self.load()
        report = IngestReport()
        store = km.store
        batch: list[tuple[str, str]] = []

        async def flush() -> None:
            keys = [context_store_key(k) for k, _ in batch]
            existing = await store.get_many(keys)
            todo: list[tuple[str, str, bool]] = []
            for (key, text), item in zip(batch, existing, strict=True):
                old = None
                if item is not None:
                    try:
                        old = ContextRecord.from_bytes(item.value)
                    except CodecError:
                        old = None
                if old is not None and old.text == text and reader.current(old):
                    report.unchanged += 1
                    continue
                todo.append((key, text, item is not None and (old is None or old.text != text)))
            records = await self.run(lambda: [reader.prepare(k, t) for k, t, _ in todo])
            from keymiss.stores.base import Write

            await store.set_many([Write(context_store_key(r.key), r.to_bytes()) for r in records])
            for key, _, changed in todo:
                if changed:
                    report.replaced += 1
                    report.forgotten_answers += await forget_answers(km, answers_pattern(key))
                else:
                    report.added += 1
            if progress:
                progress(len(batch))
            batch.clear()

        for pair in pairs:
            batch.append(pair)
            if len(batch) >= batch_size:
                await flush()
        if batch:
            await flush()
        await self.settle()
        return report


SERVICE = "qa"
#: the numeric path the QA reader runs and why it was chosen (INFO shows it)
QA_PATH = "qa_path"


def qa_service(km: Keymiss) -> QAService:
    """The QA service ``build_qa_app`` attached to ``km`` (its reader, ``ingest``)."""
    service = km.extensions.get(SERVICE)
    if not isinstance(service, QAService):
        raise KeyError("this Keymiss has no bertqa keyspace (build it with build_qa_app)")
    return service


def reader_factory(
    model: str | None = None,
    *,
    dtype: str = "auto",
    device: str | None = None,
    params: QAParams | None = None,
    backend: str = "auto",
    graph_cache: str | None = None,
) -> Callable[[], Reader]:
    """What loads the reader: span answers from a local extractive-QA checkpoint, or, without one,
    the shipped all-MiniLM-L6-v2 encoder answering with the best-matching sentence. ``backend``
    (``auto``, ``openvino``, ``torch``: see ``keymiss.qa.backends``) says what runs the forward
    passes; ``graph_cache`` is where OpenVINO graphs built from checkpoints are kept."""

    def make_reader() -> Reader:
        from keymiss.qa.backends import load_openvino_encoder, load_openvino_qa_model, resolve_backend
        from keymiss.qa.models import default_encoder_path

        path = model or default_encoder_path()
        chosen = resolve_backend(backend, path, "span" if model else "encoder")[0]
        if chosen == "openvino":
            if model:
                return SpanReader(load_openvino_qa_model(model, dtype=dtype, cache=graph_cache), params)
            return SentenceReader(load_openvino_encoder(path, cache=graph_cache))  # type: ignore[arg-type]
        from keymiss.qa.models import load_encoder, load_qa_model, resolve_dtype

        if model:
            main = load_qa_model(model, dtype=resolve_dtype(dtype, device)[0], device=device)
            # bfloat16 weights need a float32 copy to settle close calls; autocast reuses its weights
            reduced = main.dtype.lower() in ("bfloat16", "bf16")
            verify = load_qa_model(model, device=device) if reduced else None
            return SpanReader(main, params, verify=verify)
        return SentenceReader(load_encoder(device=device))

    return make_reader


def qa_version(model: str | None, dtype: str, backend: str = "torch") -> str:
    """What a cached answer depends on: the reader, its checkpoint's files and its numeric path
    (OpenVINO's paths are named apart from torch's: their reduced-precision answers differ)."""
    from keymiss.errors import ConfigError
    from keymiss.qa.models import default_encoder_path, fingerprint

    if model:
        path = dtype if backend == "torch" else f"{backend}-{dtype}"
        return f"span:{fingerprint(model)}:{path}"
    try:
        return f"sentence:{fingerprint(default_encoder_path())}"
    except ConfigError:  # no shipped encoder: loading says so, clearly, when the app starts
        return "sentence:unavailable"


def qa_path(model: str | None, dtype: str, device: str | None, backend: str) -> dict[str, str]:
    """The backend and numeric path the reader will run, each with why (the log and INFO say them)."""
    from keymiss.errors import ConfigError
    from keymiss.qa.backends import resolve_backend, resolve_precision
    from keymiss.qa.models import default_encoder_path, resolve_dtype

    try:
        path = model or default_encoder_path()
    except ConfigError:  # no shipped encoder: loading says so when the app starts
        path = ""
    chosen, because = resolve_backend(backend, path, "span" if model else "encoder")
    if not model:
        chosen_dtype, why = "float32", "the sentence encoder runs float32"
    elif chosen == "openvino":
        chosen_dtype, why = resolve_precision(dtype)
    else:
        chosen_dtype, why = resolve_dtype(dtype, device)
    return {"dtype": chosen_dtype, "why": why, "backend": chosen, "backend_why": because}


def build_qa_app(
    km: Keymiss | None = None,
    *,
    model: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    params: QAParams | None = None,
    batch_size: int = 16,
    batch_wait_ms: float = 5.0,
    timeout: float = 120.0,
    corpus: str | None = None,
    demo: bool | None = None,
    backend: str = "auto",
    graph_cache: str | None = None,
) -> Keymiss:
    """Register the ``bertqa`` keyspace on ``km`` (a new ``Keymiss`` by default).

    With ``model`` (a local extractive-QA checkpoint) answers are spans; without it the shipped
    all-MiniLM-L6-v2 encoder answers with the best-matching sentence, and the demo corpus is
    ingested at start. ``corpus`` names a file to ingest at start (JSON lines or plain text)
    instead. ``demo``: ingest the demo corpus (True) or not (False) when there is no ``corpus``;
    None (the default) ingests it for the sentence encoder only. ``keymiss serve`` passes False
    for a store that is the user's own (``lmdb:``, ``redis://``, ``--redis``), as ``keymiss
    worker`` does unless ``--demo``: the demo's paragraphs never land there unasked.
    ``dtype="auto"`` picks the fastest faithful numeric path for this machine (``resolve_dtype``);
    the keyspace's version names it with the checkpoint's fingerprint, so answers computed under
    another model or path are never served (also from a shared server, in module mode).
    ``backend`` picks what runs the forward passes (``keymiss.qa.backends.resolve_backend``).
    """
    km = km or Keymiss()
    path = qa_path(model, dtype, device, backend)
    chosen, why = path["dtype"], path["why"]
    km.extensions[QA_PATH] = path
    service = QAService(
        reader_factory(
            model,
            dtype=chosen,
            device=device,
            params=params,
            backend=path["backend"],
            graph_cache=graph_cache,
        )
    )
    km.extensions[SERVICE] = service

    async def startup(km: Keymiss) -> None:
        # said when serving starts, not when the app is built: a bad flag's error stays one line
        log.info(
            "QA reader: %s on %s (%s), %s (%s)",
            "span model " + model if model else "sentence encoder",
            path["backend"],
            path["backend_why"],
            chosen,
            why,
        )
        progress = StartProgress(log)
        async with progress.step("loading the QA reader"):
            reader = await service.load()
        current = f"{reader.kind}:{reader.fingerprint}".encode()
        stored = await km.store.get(MODEL_KEY)
        if stored is None or stored.value != current:
            if stored is not None:
                n = await km.forget("bertqa{*}_*")
                log.info(
                    "model changed (%s -> %s): forgot %d cached answers",
                    stored.value.decode(),
                    current.decode(),
                    n,
                )
            await km.store.set(MODEL_KEY, current)
        # a user's own corpus replaces the demo's: its paragraphs never land in their store; nor
        # does the demo's where the caller says the store is the user's own (demo=False)
        sources = [corpus] if corpus else ([DEMO_CORPUS] if demo or (demo is None and not model) else [])
        for source in sources:
            pairs = list(read_corpus(source))
            async with progress.step(f"ingesting {os.path.basename(source)}", len(pairs)) as advance:
                # batches of at most 64, and at least ten of them: the progress moves as it goes
                report = await service.ingest(km, pairs, advance, max(1, min(64, -(-len(pairs) // 10))))
            log.info("ingested %s: %s", source, report)
        if not sources:  # ingesting settles; a reader with nothing to ingest settles here
            await service.settle()

    km.on_start(startup)

    @km.keyspace(
        QA_PATTERN,
        batch_size=batch_size,
        batch_wait_ms=batch_wait_ms,
        timeout=timeout,
        codec="text",
        version=qa_version(model, chosen, path["backend"]),
    )
    async def bertqa(items: list[Any]) -> list[Any]:
        reader = await service.load()
        stored = await km.store.get_many([context_store_key(it.context) for it in items])
        results: list[Any] = [None] * len(items)
        pairs: list[tuple[str, ContextRecord]] = []
        where: list[int] = []
        stale: list[int] = []
        for i, (it, item) in enumerate(zip(items, stored, strict=True)):
            context_tag = hash_tag(it.context)
            if context_tag is not None and context_tag != it.tag:
                # on a cluster the answer would land in another slot than its context
                results[i] = UnknownContextError(
                    f"hash tag {{{it.tag}}} differs from the context's {{{context_tag}}}; use "
                    f"bertqa{{{context_tag}}}_{it.context}_…",
                    keyspace=QA_PATTERN,
                )
                continue
            if item is None:
                results[i] = UnknownContextError(f"unknown context '{it.context}'", keyspace=QA_PATTERN)
                continue
            try:
                rec = ContextRecord.from_bytes(item.value)
            except CodecError as exc:
                results[i] = UnknownContextError(
                    f"context '{it.context}' is unreadable: {exc}", keyspace=QA_PATTERN
                )
                continue
            if not reader.current(rec):
                stale.append(len(pairs))
            pairs.append((it.question, rec))
            where.append(i)
        if stale:  # stored for another tokenizer or encoder: tokenise again and keep the new record
            from keymiss.stores.base import Write

            fresh = await service.run(
                lambda: [reader.prepare(pairs[j][1].key, pairs[j][1].text) for j in stale]
            )
            for j, rec in zip(stale, fresh, strict=True):
                pairs[j] = (pairs[j][0], rec)
            await km.store.set_many([Write(context_store_key(r.key), r.to_bytes()) for r in fresh])
        answers = await service.run(reader.answer, pairs) if pairs else []
        for i, answer in zip(where, answers, strict=True):
            results[i] = answer
        return results

    return km
