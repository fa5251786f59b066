"""Which library runs the reader's forward passes: OpenVINO (no torch) or PyTorch.

``--qa-backend auto`` takes OpenVINO when it is installed and the checkpoint is a plain BERT with
safetensors weights, PyTorch otherwise. On this project's reference CPU (AMX, AVX-512 BF16)
OpenVINO's bfloat16 forward pass is about twice torch's bf16-autocast one (``bench/qa.py``), and it
needs neither torch nor transformers, so the default install stays small. The OpenVINO readers
offer the same faces as the torch ones (``QAModel.forward``, ``Encoder.embed``), so ``SpanReader``
and ``SentenceReader`` and their decoding are shared.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from keymiss.errors import ConfigError
from keymiss.qa.graph import (
    BrokenCheckpoint,
    Compiled,
    UnsupportedCheckpoint,
    WordEmbeddings,
    check_checkpoint,
    load_graph,
)
from keymiss.qa.models import (
    BF16_CPU_FLAGS,
    ENCODER_MAX_TOKENS,
    cpu_flags,
    fingerprint,
    tokenizer_fingerprint,
)
from keymiss.qa.tokenizer import Tokenizer

log = logging.getLogger("keymiss.qa")

BACKENDS = ("auto", "openvino", "torch")

#: The settle margins of OpenVINO's bf16 span reader, measured with ``bench/qa_margins.py`` (six
#: sets of 600 answers): with the residual stream, layer norms and span head in float32 (the graph
#: as built), redoing answers led by less than 6 % (about 4 % of them) left 99.33-100 % of each
#: set identical to float32; with everything in bfloat16 (an OpenVINO that ignores the graph's
#: marks) bf16 answers that differed from float32 led by up to 16 %, so 20 % (about 15 %).
STREAM_MARGIN = 0.06
BF16_MARGIN = 0.20


class NoBackendError(ConfigError):
    """Neither openvino nor torch is installed: there is nothing to run a reader with."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _buildable(path: str, head: str) -> str | None:
    """Why the OpenVINO builder cannot write this checkpoint (None: it can), from its config and
    its weights' header only (cheap). A malformed checkpoint raises ``BrokenCheckpoint``: no
    backend could run it."""
    try:
        check_checkpoint(path, head)
    except BrokenCheckpoint:
        raise
    except UnsupportedCheckpoint as exc:
        return str(exc)
    return None


def resolve_backend(requested: str | None, path: str, head: str = "span") -> tuple[str, str]:
    """The backend for the checkpoint at ``path`` (a span checkpoint, or ``head="encoder"``: a
    sentence encoder) and why it was chosen."""
    name = (requested or "auto").lower()
    if name not in BACKENDS:
        raise ConfigError(f"unknown QA backend {requested!r}; use {', '.join(BACKENDS)}")
    if name == "torch":
        if not _installed("torch") or not _installed("transformers"):
            raise ConfigError(
                "--qa-backend torch needs torch and transformers (pip install 'keymiss[qa-torch]')"
            )
        return "torch", "as asked (--qa-backend)"
    try:
        problem = _buildable(path, head) if os.path.isdir(path) else None
    except BrokenCheckpoint as exc:
        raise ConfigError(f"the QA checkpoint cannot be run: {exc}") from None
    if name == "openvino":
        if not _installed("openvino"):
            raise ConfigError("--qa-backend openvino needs openvino (pip install 'keymiss[qa]')")
        if problem:
            raise ConfigError(f"--qa-backend openvino cannot run this checkpoint: {problem}")
        return "openvino", "as asked (--qa-backend)"
    if _installed("openvino") and not problem:
        return "openvino", "auto: a BERT checkpoint with safetensors weights, and openvino is installed"
    if _installed("torch") and _installed("transformers"):
        why = problem or "openvino is not installed"
        return "torch", f"auto: {why}"
    raise NoBackendError(
        "the QA reader needs openvino (pip install 'keymiss[qa]') or torch and transformers"
        + (f"; openvino cannot run this checkpoint: {problem}" if problem else "")
    )


def resolve_precision(requested: str | None) -> tuple[str, str]:
    """OpenVINO's numeric path: ``bf16`` (bfloat16 inference, close calls settled in float32) on a
    CPU with bf16 instructions, ``float32`` elsewhere or when asked."""
    name = (requested or "auto").lower()
    if name in ("float32", "fp32"):
        return "float32", "as asked (--qa-dtype)"
    if name in ("bf16", "bfloat16", "bf16-autocast"):
        return "bf16", "as asked (--qa-dtype): bfloat16 inference, close calls settled in float32"
    if name != "auto":
        raise ConfigError(f"unknown dtype {requested!r}; use auto, float32, bf16-autocast or bfloat16")
    native = sorted(cpu_flags() & set(BF16_CPU_FLAGS))
    if native:
        return "bf16", f"this CPU has {'/'.join(native)}: bfloat16 inference, close calls settled in float32"
    return "float32", "this CPU has no bf16 instructions (avx512_bf16, amx_bf16)"


@dataclass
class OpenVinoQAModel:
    """An extractive-QA checkpoint on OpenVINO, with ``QAModel``'s face."""

    path: str
    tokenizer: Tokenizer
    dtype: str
    fingerprint: str
    tokenizer_fingerprint: str
    max_positions: int
    fast: Compiled
    #: the word-embedding table, outside the graph (see ``graph.WordEmbeddings``)
    embeddings: WordEmbeddings
    #: the float32 twin that settles close calls (``dtype="bf16"``)
    precise_model: Compiled | None = None
    device: str = "cpu"
    backend: str = "openvino"
    #: answers led by less than this are settled in float32 (``load_openvino_qa_model`` sets it
    #: from the compiled graph: ``STREAM_MARGIN`` or ``BF16_MARGIN``)
    settle_margin: float = 0.2
    #: SpanReader re-runs close calls with ``precise=True`` when the fast path is reduced precision
    autocast: bool = field(init=False)

    def __post_init__(self) -> None:
        self.autocast = self.precise_model is not None

    def forward(
        self,
        input_ids: np.ndarray,
        token_type_ids: np.ndarray,
        attention_mask: np.ndarray,
        *,
        precise: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Start and end logits, float32, shape ``(batch, seq)``; ``precise`` runs float32."""
        model = self.precise_model if precise and self.precise_model is not None else self.fast
        start, end = model.run(
            {
                "inputs_embeds": self.embeddings.lookup(input_ids),
                "token_type_ids": token_type_ids,
                "attention_mask": attention_mask,
            }
        )
        return start, end

    def release(self) -> None:
        """See ``Compiled.release`` (the float32 twin shares the same mapped graph)."""
        self.fast.release()


def _max_positions(path: str) -> int:
    import json

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return int(json.load(f).get("max_position_embeddings", 512))


def load_openvino_qa_model(path: str, *, dtype: str = "auto", cache: str | None = None) -> OpenVinoQAModel:
    """A span checkpoint on OpenVINO: the graph is built from its safetensors weights (or read
    from the cache under its fingerprint) and compiled for this CPU."""
    if not os.path.isdir(path):
        raise ConfigError(f"model directory {path!r} does not exist")
    precision = resolve_precision(dtype)[0]
    tokenizer = Tokenizer(path)
    print_ = fingerprint(path)
    graph, mapped = load_graph(path, print_, "span", cache)
    fast = Compiled(graph, "bf16" if precision == "bf16" else "f32", mapped)
    precise = Compiled(graph, "f32", mapped) if precision == "bf16" else None
    del graph
    mapped.page_out()
    margin = STREAM_MARGIN if fast.float32_stream() else BF16_MARGIN
    log.info("loaded QA model %s (openvino, %s, settle margin %.0f%%)", path, precision, margin * 100)
    return OpenVinoQAModel(
        path,
        tokenizer,
        precision,
        print_,
        tokenizer_fingerprint(path),
        _max_positions(path),
        fast,
        WordEmbeddings(path),
        precise,
        settle_margin=margin,
    )


@dataclass
class OpenVinoEncoder:
    """A sentence encoder on OpenVINO, float32, with ``Encoder``'s face."""

    path: str
    tokenizer: Tokenizer
    model: Compiled
    embeddings: WordEmbeddings
    fingerprint: str
    tokenizer_fingerprint: str
    device: str = "cpu"
    backend: str = "openvino"
    #: tokens a sentence is cut to: ``ENCODER_MAX_TOKENS``, or the checkpoint's positions if fewer
    max_length: int = ENCODER_MAX_TOKENS

    def embed(self, texts: list[str], batch_size: int = 16) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            ids, types, mask = self.tokenizer.batch(texts[i : i + batch_size], self.max_length)
            feed = {
                "inputs_embeds": self.embeddings.lookup(ids),
                "token_type_ids": types,
                "attention_mask": mask,
            }
            (hidden,) = self.model.run(feed)
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), np.float32(1e-9))
            norm = np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), np.float32(1e-12))
            out.append(pooled / norm)
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

    def release(self) -> None:
        """See ``Compiled.release``."""
        self.model.release()


def load_openvino_encoder(path: str, *, cache: str | None = None) -> OpenVinoEncoder:
    print_ = fingerprint(path)
    graph, mapped = load_graph(path, print_, "encoder", cache)
    model = Compiled(graph, "f32", mapped)
    del graph
    mapped.page_out()
    return OpenVinoEncoder(
        path,
        Tokenizer(path),
        model,
        WordEmbeddings(path),
        print_,
        tokenizer_fingerprint(path),
        max_length=min(ENCODER_MAX_TOKENS, _max_positions(path)),
    )
