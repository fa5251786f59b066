"""Any transformers pipeline as a keyspace: tiny models built here, answers compared with calling the
pipeline directly on the same batch."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from keymiss import Keymiss
from keymiss.apps.pipelines import plain
from keymiss.errors import ConfigError
from keymiss.stores.memory import MemoryStore

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
VOCAB += "the cat sat on mat good bad movie loved it hated plot".split()

TEXTS = ["the cat sat on the mat", "good movie", "i loved it", "bad plot", "the movie"]


def _build(root: Path, task: str, seed: int = 0) -> str:
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertModel,
        BertTokenizer,
    )

    classes = {
        "text-classification": BertForSequenceClassification,
        "token-classification": BertForTokenClassification,
        "fill-mask": BertForMaskedLM,
        "feature-extraction": BertModel,
        "question-answering": BertForQuestionAnswering,
    }
    path = root / f"{task}-{seed}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizer(vocab=str(path / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(path))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2 if task == "question-answering" else 3,
    )
    classes[task](config).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipelines")


def _pipe(root: Path, task: str, seed: int = 0) -> Any:
    path = _build(root, task, seed)
    return transformers.pipeline(task, model=path, tokenizer=path, device="cpu")


def _direct(pipe: Any, inputs: list[str], **kwargs: Any) -> list[Any]:
    """The pipeline called directly on the batch: one result per input."""
    return [plain(r) for r in pipe((x for x in inputs), batch_size=len(inputs), **kwargs)]


@pytest.mark.parametrize("task", ["text-classification", "token-classification", "fill-mask"])
async def test_a_pipeline_keyspace_answers_as_the_pipeline_does_batched(models: Path, task: str) -> None:
    pipe = _pipe(models, task)
    texts = [t + " [MASK]" for t in TEXTS] if task == "fill-mask" else TEXTS
    km = Keymiss(store=MemoryStore(1 << 24))
    ks = km.pipeline_keyspace("p:<text>", pipe, batch_size=8, batch_wait_ms=50)
    async with km:
        got = await asyncio.gather(*(km.get(f"p:{t}") for t in texts))
        assert got == _direct(pipe, texts)
        item = await km.get_item(f"p:{texts[0]}")
        assert item is not None and json.loads(item.value) == got[0]  # a plain GET reads JSON
        assert ks.stats.calls == 1 and ks.stats.computations == len(texts)  # one batch
        assert km.stats()["keyspaces"]["p:<text>"]["version"] == ks.current_version()


async def test_feature_extraction_stores_numpy_arrays(models: Path) -> None:
    pipe = _pipe(models, "feature-extraction")
    km = Keymiss(store=MemoryStore(1 << 24))
    km.pipeline_keyspace("embed:*", pipe, batch_size=4, batch_wait_ms=50)
    async with km:
        got = await asyncio.gather(*(km.get(f"embed:{t}") for t in TEXTS[:3]))
        for value, want in zip(got, _direct(pipe, TEXTS[:3]), strict=True):
            assert isinstance(value, np.ndarray) and value.dtype == np.float32
            np.testing.assert_array_equal(value, np.asarray(want, dtype=np.float32))


async def test_question_answering_takes_question_and_context_fields(models: Path) -> None:
    pipe = _pipe(models, "question-answering")
    km = Keymiss(store=MemoryStore(1 << 24))
    km.pipeline_keyspace("qa:<context>|<question>", pipe, batch_size=4, batch_wait_ms=50)
    pairs = [("the cat sat on the mat", "who sat"), ("good movie bad plot", "what was bad")]
    async with km:
        got = await asyncio.gather(*(km.get(f"qa:{c}|{q}") for c, q in pairs))
        want = pipe(question=[q for _, q in pairs], context=[c for c, _ in pairs], batch_size=2)
        assert got == plain(want)
        one = await km.get("qa:the cat sat|where")
        assert one == plain(pipe(question="where", context="the cat sat"))


async def test_long_inputs_go_by_content_hash(models: Path) -> None:
    pipe = _pipe(models, "text-classification")
    km = Keymiss(store=MemoryStore(1 << 24))
    km.pipeline_keyspace("sentiment:<sha256>", pipe, inputs="doc:<sha256>")
    text = " ".join(TEXTS * 20)
    digest = hashlib.sha256(text.encode()).hexdigest()
    async with km:
        await km.set(f"doc:{digest}", text)  # what a client's SET doc:<sha256> does
        assert await km.get(f"sentiment:{digest}") == _direct(pipe, [text])[0]
        wrong = hashlib.sha256(b"other").hexdigest()
        await km.set(f"doc:{wrong}", text)  # stored under a digest it does not have
        with pytest.raises(Exception, match="does not have SHA-256"):
            await km.get(f"sentiment:{wrong}")
        with pytest.raises(Exception, match="no input stored"):
            await km.get(f"sentiment:{'0' * 64}")


async def test_a_new_model_is_a_new_version(models: Path, tmp_path: Path) -> None:
    first, second = _pipe(models, "text-classification", 0), _pipe(models, "text-classification", 1)
    km_a = Keymiss(store=f"lmdb:{tmp_path / 'db'}")
    ks_a = km_a.pipeline_keyspace("p:<text>", first)
    km_b = Keymiss(store=f"lmdb:{tmp_path / 'db'}")  # the same cache, reopened with another model
    ks_b = km_b.pipeline_keyspace("p:<text>", second)
    assert ks_a.current_version() != ks_b.current_version()
    async with km_a:
        old = await km_a.get("p:good movie")
    async with km_b:  # the same store, another model: the old answer is not served
        assert await km_b.get("p:good movie") == _direct(second, ["good movie"])[0]
        assert ks_b.stats.version_misses == 1
    assert old == _direct(first, ["good movie"])[0]


def test_a_pipeline_keyspace_checks_its_fields(models: Path) -> None:
    km = Keymiss()
    with pytest.raises(ConfigError, match="question"):
        km.pipeline_keyspace("qa:<text>", _pipe(models, "question-answering"))
    with pytest.raises(ConfigError, match="one input"):
        km.pipeline_keyspace("p:<a>|<b>", _pipe(models, "fill-mask"))
