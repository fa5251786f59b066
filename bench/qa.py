"""Question answering on misses: keymiss against the Hugging Face pipeline, in one run.

Builds a real-sized checkpoint offline — a ``BertForQuestionAnswering`` whose encoder is the shipped
all-MiniLM-L6-v2 weights and whose span head is seeded — in a temp dir, loads it through keymiss's
own loader (as ``--model`` does), and answers 200 distinct (context, question) pairs over ~300-token
contexts four ways:

(a) ``pipeline("question-answering")`` once per request (the naive baseline, float32);
(b) keymiss misses through the engine, 32 requests in flight, dynamic batching, ``--dtype`` weights;
(c) the raw batched forward pass of (b)'s model on the same windows (the limit);
(d) keymiss hits for the same keys;
(e) keymiss's span reader on ONNX Runtime (the float32 checkpoint exported with ``torch.onnx``),
    when ``onnxruntime`` is installed, for comparison;
(f) served misses: ``keymiss serve --model`` (the default front end, embedded Valkey and its
    worker) with 32 clients, one server per backend, in rounds that alternate with (a) on fresh
    questions; the median round is reported.

(b) and (c) run once per ``--paths`` entry, ``backend:dtype`` (``openvino:auto`` is the default
path: OpenVINO, bfloat16 on a CPU with bf16 instructions, close calls settled in float32).
Prints answers/s, p50/p99 latency, × (a), (b)/(c) and how many answers equal (a)'s.
Run: ``python bench/qa.py`` (``--pairs 64 --rounds 1`` for a shorter run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from keymiss import Keymiss
from keymiss.qa import build_qa_app, qa_service
from keymiss.qa.contexts import read_corpus
from keymiss.qa.models import default_encoder_path, load_qa_model
from keymiss.qa.reader import SpanReader

QUESTION_WORDS = ["What", "Who", "Which", "How", "Why", "When", "Where"]


def build_checkpoint(directory: str, seed: int = 0) -> str:
    """MiniLM-L6 encoder weights + a seeded span head, saved like any fine-tuned checkpoint."""
    import shutil

    import torch
    from transformers import AutoModel, AutoTokenizer, BertForQuestionAnswering

    src = default_encoder_path()
    encoder = AutoModel.from_pretrained(src)
    torch.manual_seed(seed)
    qa = BertForQuestionAnswering(encoder.config)
    qa.bert.load_state_dict(encoder.state_dict(), strict=False)
    with torch.no_grad():
        qa.qa_outputs.weight.normal_(0.0, 0.5)
        qa.qa_outputs.bias.zero_()
    qa.save_pretrained(directory)
    AutoTokenizer.from_pretrained(src).save_pretrained(directory)
    for name in ("vocab.txt",):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), directory)
    return directory


def make_pairs(n: int, tokenizer: Any, seed: int = 1) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """~300-token contexts made of the demo corpus's sentences, and n distinct questions about them."""
    from keymiss.qa.app import DEMO_CORPUS
    from keymiss.qa.contexts import split_sentences

    sentences = []
    for _, text in read_corpus(DEMO_CORPUS):
        sentences += [text[a:b] for a, b in split_sentences(text)]
    rnd = random.Random(seed)
    contexts: dict[str, str] = {}
    for c in range(max(1, n // 10)):
        parts: list[str] = []
        while len(tokenizer(" ".join(parts), add_special_tokens=False)["input_ids"]) < 290:
            parts.append(rnd.choice(sentences))
        contexts[f"bench:{{c{c}}}:{c}"] = " ".join(parts)
    pairs = []
    keys = list(contexts)
    for i in range(n):
        ctx = keys[i % len(keys)]
        words = rnd.sample(contexts[ctx].replace(".", "").split(), 6)
        pairs.append((ctx, f"{rnd.choice(QUESTION_WORDS)} {' '.join(words).lower()} {i}?"))
    return contexts, pairs


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


async def run_keymiss(
    model: str,
    backend: str,
    dtype: str,
    contexts: dict[str, str],
    pairs: list[tuple[str, str]],
    concurrency: int,
    batch_size: int,
) -> dict[str, Any]:
    km = build_qa_app(
        Keymiss(sweep_interval=0),
        model=model,
        dtype=dtype,
        backend=backend,
        batch_size=batch_size,
        batch_wait_ms=5,
    )
    async with km:
        await qa_service(km).ingest(km, list(contexts.items()))
        keys = [f"bertqa{{{ctx.split('{')[1].split('}')[0]}}}_{ctx}_{q}" for ctx, q in pairs]
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []

        async def one(key: str) -> str:
            async with gate:
                t0 = time.perf_counter()
                value = await km.get(key)
                latencies.append(time.perf_counter() - t0)
                return str(value)

        t0 = time.perf_counter()
        answers = await asyncio.gather(*(one(k) for k in keys))
        miss_time = time.perf_counter() - t0
        miss_lat = list(latencies)
        latencies.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(k) for k in keys))
        hit_time = time.perf_counter() - t0
        reader: SpanReader = qa_service(km).reader
        stats = km.stats()["keyspaces"]["bertqa{<tag>}_<context>_<question>"]
        path = km.extensions["qa_path"]
    return {
        "answers": answers,
        "miss_time": miss_time,
        "miss_lat": miss_lat,
        "hit_time": hit_time,
        "hit_lat": list(latencies),
        "reader": reader,
        "calls": stats["calls"],
        "path": f"{path['backend']} {path['dtype']}",
    }


def raw_forward(
    reader: SpanReader, contexts: dict[str, str], pairs: list[tuple[str, str]], batch: int
) -> float:
    """The same windows, batched and padded the same way, through the model alone."""
    records = {k: reader.prepare(k, t) for k, t in contexts.items()}
    items = [(q, records[ctx]) for ctx, q in pairs]
    tok = reader.model.tokenizer
    encoded = tok([q for q, _ in items], add_special_tokens=False)["input_ids"]
    windows = []
    for i, ids in enumerate(encoded):
        windows.extend(reader._windows(i, list(ids), len(items[i][1].ids)))
    t0 = time.perf_counter()
    for start in range(0, len(windows), batch):
        reader._forward(windows[start : start + batch], items, reader.model)
    return time.perf_counter() - t0


class OnnxQAModel:
    """keymiss's ``QAModel`` face over an ONNX Runtime session of the same float32 checkpoint."""

    def __init__(self, ref: Any, path: str) -> None:
        import onnxruntime as ort
        import torch

        self.tokenizer = ref.tokenizer
        self.max_positions = ref.max_positions
        self.autocast = False
        self.precise_model = None
        self.dtype = "float32"
        self.device = "cpu"
        self.fingerprint = ref.fingerprint
        self.tokenizer_fingerprint = ref.tokenizer_fingerprint
        from transformers import AutoModelForQuestionAnswering

        # eager attention, traced on a padded batch: the traced graph keeps the masking that the
        # default attention decides in Python (an unpadded trace drops it, and padded rows go wrong)
        model = AutoModelForQuestionAnswering.from_pretrained(ref.path, attn_implementation="eager").eval()
        dummy = torch.ones((2, 16), dtype=torch.int64)
        mask = dummy.clone()
        mask[1, 10:] = 0
        axes = {0: "batch", 1: "seq"}
        torch.onnx.export(
            model,
            (dummy, mask, dummy * 0),  # forward's order: input_ids, attention_mask, token_type_ids
            path,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["start_logits", "end_logits"],
            dynamic_axes={name: axes for name in ("input_ids", "token_type_ids", "attention_mask")},
            opset_version=17,
            dynamo=False,
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def forward(
        self, input_ids: Any, token_type_ids: Any, attention_mask: Any, *, precise: bool = False
    ) -> tuple[Any, Any]:
        start, end = self.session.run(
            None,
            {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask},
        )
        return start, end


def run_onnx(
    ref: Any, path: str, contexts: dict[str, str], pairs: list[tuple[str, str]], batch: int
) -> dict[str, Any] | None:
    """(e): every pair answered by keymiss's span reader with ONNX Runtime doing the forward passes."""
    try:
        import onnxruntime
    except ImportError:
        return None
    from keymiss.qa.reader import QAParams

    reader = SpanReader(OnnxQAModel(ref, path), QAParams())  # type: ignore[arg-type]
    records = {k: reader.prepare(k, t) for k, t in contexts.items()}
    items = [(q, records[ctx]) for ctx, q in pairs]
    reader.answer(items[:4])  # warm up
    t0 = time.perf_counter()
    answers = []
    for start in range(0, len(items), batch):
        answers.extend(reader.answer(items[start : start + batch]))
    return {"answers": answers, "time": time.perf_counter() - t0, "version": onnxruntime.__version__}


def pipeline_round(pipe: Any, contexts: dict[str, str], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """(a): the pipeline called once per request, in order."""
    latencies: list[float] = []
    answers = []
    t0 = time.perf_counter()
    for ctx, q in pairs:
        t1 = time.perf_counter()
        answers.append(pipe(question=q, context=contexts[ctx])["answer"])
        latencies.append(time.perf_counter() - t1)
    return {"answers": answers, "time": time.perf_counter() - t0, "lat": latencies}


def same(a: list[str], b: list[str]) -> str:
    agree = sum(x == y for x, y in zip(a, b, strict=True))
    return f"{agree}/{len(a)} ({100 * agree / len(a):.1f}%)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of (a) and (f)")
    parser.add_argument(
        "--paths",
        default="openvino:auto,torch:auto,openvino:float32,torch:float32",
        help="comma list of backend:dtype for (b) and (c); dtype auto, float32, bf16-autocast or bfloat16",
    )
    parser.add_argument("--served", default="openvino,torch", help="backends for (f); empty: none")
    args = parser.parse_args(argv)

    import torch
    from qa_served import Served, qa_key  # noqa: F401 (bench/ is the script's directory)
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_checkpoint(os.path.join(tmp, "minilm-qa"))
        ref_model = load_qa_model(model)
        contexts, pairs = make_pairs(args.pairs, ref_model.tokenizer)
        tokens = [len(ref_model.tokenizer(c)["input_ids"]) for c in contexts.values()]
        servers = [Served(model, b, contexts, tmp) for b in args.served.split(",") if b]
        try:
            for srv in servers:
                srv.wait_ready()
            pipe = pipeline("question-answering", model=model, tokenizer=model, device="cpu")
            pipe(question="warm up?", context=next(iter(contexts.values())))
            rounds: list[dict[str, Any]] = []
            for r in range(args.rounds):  # fresh questions each round: every served key is a miss
                these = [(ctx, q if r == 0 else f"{q} {r}") for ctx, q in pairs]
                a = pipeline_round(pipe, contexts, these)
                rounds.append(
                    {"a": a, "f": {srv.backend: srv.round(these, args.concurrency) for srv in servers}}
                )
            served_paths = {srv.backend: srv.path() for srv in servers}
        finally:
            for srv in servers:
                srv.stop()
        ref_answers = (
            rounds[0]["a"]["answers"] if rounds else pipeline_round(pipe, contexts, pairs)["answers"]
        )

        runs = []
        for entry in args.paths.split(","):
            backend, _, dtype = entry.partition(":")
            b = asyncio.run(
                run_keymiss(
                    model, backend, dtype or "auto", contexts, pairs, args.concurrency, args.batch_size
                )
            )
            time_c = min(raw_forward(b["reader"], contexts, pairs, args.batch_size) for _ in range(2))
            runs.append((f"{entry} = {b['path']}", b, time_c))
        onnx = run_onnx(ref_model, os.path.join(tmp, "qa.onnx"), contexts, pairs, args.batch_size)

    n = len(pairs)
    rates_a = [n / r["a"]["time"] for r in rounds]
    rate_a = float(np.median(rates_a))
    lat_a = rounds[len(rounds) // 2]["a"]["lat"]
    print(f"# QA on misses: {n} (context, question) pairs, contexts {min(tokens)}-{max(tokens)} tokens\n")
    print(
        f"checkpoint: MiniLM-L6 encoder + seeded span head; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; concurrency {args.concurrency}, batch {args.batch_size}; "
        f"(a) and (f): median of {len(rounds)} alternating rounds\n"
    )
    print("| path | answers/s | p50 ms | p99 ms | × (a) | (b)/(c) | same answer as (a) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| (a) pipeline, one request at a time, float32 | {rate_a:.1f} | {pct(lat_a, 50):.1f} | "
        f"{pct(lat_a, 99):.1f} | 1.00 | | |"
    )
    for backend, desc in served_paths.items():
        rates = [n / r["f"][backend]["time"] for r in rounds]
        ratios = [x / y for x, y in zip(rates, rates_a, strict=True)]
        mid = int(np.argsort(ratios)[len(ratios) // 2])
        got = [a for r in rounds for a in r["f"][backend]["answers"]]
        want = [a for r in rounds for a in r["a"]["answers"]]
        lat = rounds[mid]["f"][backend]["lat"]
        print(
            f"| (f) keymiss serve --model, {args.concurrency} clients: {desc} | {rates[mid]:.1f} | "
            f"{pct(lat, 50):.1f} | {pct(lat, 99):.1f} | {ratios[mid]:.2f} "
            f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}) | | {same(got, want)} |"
        )
    for name, b, time_c in runs:
        rate_b, rate_c, rate_d = n / b["miss_time"], n / time_c, n / b["hit_time"]
        print(
            f"| (b) keymiss misses in process, {name} ({b['calls']} batches, {b['reader'].verified} close "
            f"calls redone in float32) | {rate_b:.1f} | {pct(b['miss_lat'], 50):.1f} | "
            f"{pct(b['miss_lat'], 99):.1f} | "
            f"{rate_b / rate_a:.2f} | {rate_b / rate_c:.2f} | {same(b['answers'], ref_answers)} |"
        )
        print(f"| (c) raw batched forward, {name} | {rate_c:.1f} | | | {rate_c / rate_a:.2f} | | |")
        print(
            f"| (d) keymiss hits | {rate_d:,.0f} | {pct(b['hit_lat'], 50):.3f} | "
            f"{pct(b['hit_lat'], 99):.3f} | "
            f"{rate_d / rate_a:,.0f} | | |"
        )
    if onnx is None:
        print("| (e) ONNX Runtime | not run: pip install onnxruntime onnx | | | | | |")
    else:
        rate_e = n / onnx["time"]
        print(
            f"| (e) span reader on ONNX Runtime {onnx['version']}, float32, batch {args.batch_size} | "
            f"{rate_e:.1f} | | | {rate_e / rate_a:.2f} | | {same(onnx['answers'], ref_answers)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
