"""A BERT forward pass without torch: OpenVINO graphs built straight from a checkpoint's weights.

The checkpoint's ``model.safetensors`` is read with numpy (the format is a JSON header and raw
little-endian arrays), and the same computation as Hugging Face's ``BertModel`` (embeddings, post-LN
encoder layers with erf GELU, the span head of ``BertForQuestionAnswering``) is written with
OpenVINO's opset API. OpenVINO then runs it with bfloat16 matrix products on AMX / AVX-512 BF16
(``INFERENCE_PRECISION_HINT=bf16``) or in float32. Nothing is exported or traced, so the serving
process never imports torch; the built graph is saved under a directory named after the
checkpoint's fingerprint, so a restart reads it back instead of building it again. (OpenVINO's
own compiled-model cache is left off: with it, OpenVINO 2026.4's bf16 path returned NaN logits
here; compiling takes well under a second.)
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import sys
from typing import Any

import numpy as np

from keymiss.errors import ConfigError

log = logging.getLogger("keymiss.qa")

#: safetensors dtype names -> numpy (BF16 is widened to float32 by hand: numpy has no bfloat16)
_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "BF16": "<u2"}


#: bumped whenever ``build_bert`` writes a different graph, so a cached one of an older layout is
#: never read back
GRAPH_VERSION = 2


class UnsupportedCheckpoint(ConfigError):
    """The checkpoint is not a plain BERT this builder can write (the torch backend can still run it)."""


class Mapped:
    """A file mapped copy-on-write (never written): weights read from it cost no copy, and once
    OpenVINO has compiled its own layout of them, ``page_out`` hands the file's pages back, so
    they stop counting in the process's resident memory (a page read again is read back from the
    file, never lost)."""

    def __init__(self, file: str) -> None:
        with open(file, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)

    def page_out(self) -> None:
        # Linux 5.4+ (Python before 3.12 lacks the name; its value is 21); elsewhere pages stay
        advice = getattr(mmap, "MADV_PAGEOUT", 21 if sys.platform == "linux" else None)
        if advice is not None:
            try:
                self.map.madvise(advice)
            except OSError as exc:
                log.debug("madvise(MADV_PAGEOUT) refused: %s", exc)


def read_safetensors(file: str, mapped: Mapped | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as a float32 (or integer) numpy array. Float32
    tensors are read-only maps of the file, not copies: only the pages a forward pass touches
    (the embedding rows of the tokens it sees, say) become resident."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    whole = (mapped or Mapped(file)).bytes
    base = 8 + size
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind = _DTYPES.get(info["dtype"])
        if kind is None:
            raise UnsupportedCheckpoint(f"{file}: tensor {name} has dtype {info['dtype']}")
        a, b = info["data_offsets"]
        arr = whole[base + a : base + b].view(kind).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif arr.dtype.kind == "f" and arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        out[name] = arr
    return out


class WordEmbeddings:
    """The checkpoint's word-embedding table, (vocabulary, hidden) float32, read from its mapped file.

    It stays out of the compiled graph, where it would be half of a MiniLM's resident weights:
    ``lookup`` gathers the rows of a batch's token ids (an exact copy, as the graph's gather would
    be) and then drops the file's pages from this process (they stay in the page cache; an
    unmodified page of a private mapping is read back, never lost), so an idle reader holds none."""

    def __init__(self, path: str) -> None:
        self.mapped = Mapped(os.path.join(path, "model.safetensors"))
        weights = read_safetensors(os.path.join(path, "model.safetensors"), self.mapped)
        for name in ("bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"):
            if name in weights:
                self.table = weights[name]
                return
        raise UnsupportedCheckpoint(f"{path!r}: no word embeddings")

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        rows = self.table[ids]
        if sys.platform == "linux":
            self.mapped.map.madvise(mmap.MADV_DONTNEED)
        return rows


def bert_config(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config: dict[str, Any] = json.load(f)
    except (OSError, ValueError) as exc:
        raise UnsupportedCheckpoint(f"{path!r}: no readable config.json ({exc})") from exc
    if config.get("model_type") != "bert":
        raise UnsupportedCheckpoint(f"{path!r} is a {config.get('model_type')!r} model, not bert")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedCheckpoint(f"{path!r}: {config['position_embedding_type']} position embeddings")
    if config.get("hidden_act", "gelu") != "gelu":
        raise UnsupportedCheckpoint(f"{path!r}: activation {config['hidden_act']!r}, not gelu")
    return config


def build_bert(path: str, head: str, mapped: Mapped | None = None) -> Any:
    """The OpenVINO model of a BERT checkpoint: ``head="span"`` outputs start and end logits,
    ``head="encoder"`` the last hidden state. Inputs: inputs_embeds (float32, the word embeddings
    of the ids: see ``WordEmbeddings``), token_type_ids and attention_mask (int64); batch and
    sequence are dynamic."""
    import openvino as ov
    import openvino.opset15 as op

    config = bert_config(path)
    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise UnsupportedCheckpoint(f"{path!r} has no model.safetensors")
    weights = read_safetensors(file, mapped)
    prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""

    def w(name: str) -> Any:
        # the encoder's tensors carry ``bert.`` in a span checkpoint; its head's do not
        full = name if name.startswith("qa_outputs") else prefix + name
        try:
            # shared: the graph refers to the mapped file instead of holding a copy
            return op.constant(weights[full], shared_memory=True)
        except KeyError:
            raise UnsupportedCheckpoint(f"{path!r}: no tensor {full}") from None

    eps = float(config.get("layer_norm_eps", 1e-12))
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    size = hidden // heads

    def linear(x: Any, name: str) -> Any:
        return op.add(op.matmul(x, w(name + ".weight"), False, True), w(name + ".bias"))

    def norm(x: Any, name: str) -> Any:
        x = op.mvn(x, op.constant(np.array([-1], dtype=np.int64)), True, eps, "inside_sqrt")
        return op.add(op.multiply(x, w(name + ".weight")), w(name + ".bias"))

    def split_heads(x: Any) -> Any:
        x = op.reshape(x, op.constant(np.array([0, 0, heads, size], dtype=np.int64)), True)
        return op.transpose(x, op.constant(np.array([0, 2, 1, 3], dtype=np.int64)))

    words = op.parameter([-1, -1, hidden], ov.Type.f32, name="inputs_embeds")
    types = op.parameter([-1, -1], ov.Type.i64, name="token_type_ids")
    mask = op.parameter([-1, -1], ov.Type.i64, name="attention_mask")
    zero = op.constant(np.int64(0))
    seq = op.gather(op.shape_of(mask), op.constant(np.int64(1)), zero)
    positions = op.range(zero, seq, op.constant(np.int64(1)), ov.Type.i64)
    x = op.add(words, op.gather(w("embeddings.position_embeddings.weight"), positions, zero))
    x = op.add(x, op.gather(w("embeddings.token_type_embeddings.weight"), types, zero))
    x = norm(x, "embeddings.LayerNorm")
    # padding keys get -10000 added to their scores: after softmax exactly 0, as transformers' float32
    # minimum gives, and still finite in bfloat16 (where that minimum would round to -inf)
    keep = op.unsqueeze(op.convert(mask, ov.Type.f32), op.constant(np.array([1, 2], dtype=np.int64)))
    bias = op.multiply(op.subtract(op.constant(np.float32(1.0)), keep), op.constant(np.float32(-10000.0)))
    scale = op.constant(np.float32(1.0 / np.sqrt(size)))
    for i in range(int(config["num_hidden_layers"])):
        layer = f"encoder.layer.{i}."
        q = split_heads(linear(x, layer + "attention.self.query"))
        k = split_heads(linear(x, layer + "attention.self.key"))
        v = split_heads(linear(x, layer + "attention.self.value"))
        ctx = op.scaled_dot_product_attention(q, k, v, bias, scale, causal=False)
        ctx = op.transpose(ctx, op.constant(np.array([0, 2, 1, 3], dtype=np.int64)))
        ctx = op.reshape(ctx, op.constant(np.array([0, 0, hidden], dtype=np.int64)), True)
        x = norm(
            op.add(linear(ctx, layer + "attention.output.dense"), x), layer + "attention.output.LayerNorm"
        )
        inner = op.gelu(linear(x, layer + "intermediate.dense"), "erf")
        x = norm(op.add(linear(inner, layer + "output.dense"), x), layer + "output.LayerNorm")
    if head == "span":
        logits = linear(x, "qa_outputs")
        axis = op.constant(np.int64(2))
        start = op.gather(logits, op.constant(np.int64(0)), axis, name="start_logits")
        end = op.gather(logits, op.constant(np.int64(1)), axis, name="end_logits")
        outputs = [start.output(0), end.output(0)]
        outputs[0].get_tensor().set_names({"start_logits"})
        outputs[1].get_tensor().set_names({"end_logits"})
    else:
        x.output(0).get_tensor().set_names({"last_hidden_state"})
        outputs = [x.output(0)]
    return ov.Model(outputs, [words, types, mask], f"bert-{head}")


def cache_root(base: str | None = None) -> str:
    """Where built graphs live: ``base`` (beside the store) or the user's cache directory."""
    if base:
        return base
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "keymiss", "qa-graphs")


def load_graph(path: str, fingerprint: str, head: str, cache: str | None = None) -> tuple[Any, Mapped]:
    """The OpenVINO model for a checkpoint (read back from the cache when built before) and the
    mapped file its weights live in (``Mapped.page_out`` once it is compiled)."""
    import openvino as ov

    where = os.path.join(cache_root(cache), f"{fingerprint}-{head}-v{GRAPH_VERSION}")
    xml = os.path.join(where, "model.xml")
    if not os.path.isfile(xml):
        mapped = Mapped(os.path.join(path, "model.safetensors"))
        model = build_bert(path, head, mapped)
        try:
            os.makedirs(where, exist_ok=True)
            tmp = os.path.join(where, f"model.{os.getpid()}.xml")
            ov.save_model(model, tmp, compress_to_fp16=False)
            os.replace(tmp[:-4] + ".bin", xml[:-4] + ".bin")
            os.replace(tmp, xml)
        except (OSError, RuntimeError) as exc:  # a read-only cache costs a build per start, not the reader
            log.warning("cannot cache the QA graph in %s: %s", where, exc)
            return model, mapped
        del model, mapped  # read back below: the first start runs what every later one will
    try:
        weights = Mapped(xml[:-4] + ".bin")
        with open(xml, encoding="utf-8") as f:
            text = f.read()
        return ov.Core().read_model(text, ov.Tensor(weights.bytes, shared_memory=True)), weights
    except (OSError, ValueError, RuntimeError) as exc:  # a torn or foreign file: build it again
        log.warning("rebuilding the cached QA graph %s: %s", xml, exc)
        mapped = Mapped(os.path.join(path, "model.safetensors"))
        return build_bert(path, head, mapped), mapped


class Compiled:
    """One compiled OpenVINO model and its request: ``run`` feeds numpy arrays, returns numpy arrays."""

    def __init__(self, model: Any, precision: str, mapped: Mapped, threads: int | None = None) -> None:
        import openvino as ov

        # the compiled model still reads some constants where the graph left them: keep them mapped
        self.mapped = mapped
        core = ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(inputs)
        return [np.asarray(result[out], dtype=np.float32) for out in self.compiled.outputs]
