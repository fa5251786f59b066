"""A tiny extractive-QA checkpoint built on the spot, and the QA pipeline as the reference."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "the a an of in on to and or is are was were by for with from as at it its this that which who "
    "what when where why how many much does do did virus viral transmission among adults children "
    "cells protein proteins bind binding receptor receptors immune response infection infects host "
    "hosts human humans mouse mice study studies shows showed result results data model models cache "
    "caching key keys value values snake_case performs perform spread spreads through contact "
    "droplets surface surfaces water temperature high low rapid slowly per cent year years day days "
    "first second third new old"
).split()

SHORT_CONTEXT = (
    "The virus spreads through contact and droplets among adults. Children show a low immune response, "
    "while adults show a rapid response. The receptor binds the viral protein in human cells."
)


def long_context(n: int = 60) -> str:
    """About 1500 word-piece tokens with this vocabulary: several 384-token windows."""
    import random

    rnd = random.Random(7)
    sentences = []
    for i in range(n):
        words = rnd.sample(WORDS, 9)
        sentences.append(" ".join(words).capitalize() + f" {i}.")
    return " ".join(sentences)


def build_checkpoint(path: Path, seed: int) -> str:
    """A 2-layer BERT with a WordPiece vocabulary of the test words, saved and loadable by path."""
    from transformers import BertConfig, BertForQuestionAnswering, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,?!'-_"]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab += sorted(set(WORDS) - set(vocab))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab=str(path / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(path))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    model = BertForQuestionAnswering(config)
    with torch.no_grad():  # a peaky span head, so answers do not hinge on float noise
        model.qa_outputs.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-qa") / "model", seed=0)


@pytest.fixture(scope="session")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-qa-b") / "model", seed=1)


@pytest.fixture(scope="session")
def reference(tiny_model: str) -> Any:
    from transformers import pipeline

    return pipeline("question-answering", model=tiny_model, tokenizer=tiny_model, device="cpu")


def write_corpus(path: Path, contexts: dict[str, str]) -> str:
    path.write_text("".join(json.dumps({"key": k, "text": t}) + "\n" for k, t in contexts.items()))
    return str(path)
