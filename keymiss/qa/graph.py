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
import os
import struct
from typing import Any

import numpy as np

from keymiss.errors import ConfigError

log = logging.getLogger("keymiss.qa")

#: safetensors dtype names -> numpy (BF16 is widened to float32 by hand: numpy has no bfloat16)
_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "BF16": "<u2"}


class UnsupportedCheckpoint(ConfigError):
    """The checkpoint is not a plain BERT this builder can write (the torch backend can still run it)."""


def read_safetensors(file: str) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as a float32 (or integer) numpy array."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        base = 8 + size
        out: dict[str, np.ndarray] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            kind = _DTYPES.get(info["dtype"])
            if kind is None:
                raise UnsupportedCheckpoint(f"{file}: tensor {name} has dtype {info['dtype']}")
            a, b = info["data_offsets"]
            f.seek(base + a)
            arr = np.frombuffer(f.read(b - a), dtype=kind).reshape(info["shape"])
            if info["dtype"] == "BF16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            elif arr.dtype.kind == "f":
                arr = arr.astype(np.float32)
            out[name] = arr
    return out


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


def build_bert(path: str, head: str) -> Any:
    """The OpenVINO model of a BERT checkpoint: ``head="span"`` outputs start and end logits,
    ``head="encoder"`` the last hidden state. Inputs: input_ids, token_type_ids, attention_mask
    (int64, batch × sequence, both dynamic)."""
    import openvino as ov
    import openvino.opset15 as op

    config = bert_config(path)
    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise UnsupportedCheckpoint(f"{path!r} has no model.safetensors")
    weights = read_safetensors(file)
    prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""

    def w(name: str) -> Any:
        # the encoder's tensors carry ``bert.`` in a span checkpoint; its head's do not
        full = name if name.startswith("qa_outputs") else prefix + name
        try:
            return op.constant(weights[full])
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

    ids = op.parameter([-1, -1], ov.Type.i64, name="input_ids")
    types = op.parameter([-1, -1], ov.Type.i64, name="token_type_ids")
    mask = op.parameter([-1, -1], ov.Type.i64, name="attention_mask")
    zero = op.constant(np.int64(0))
    seq = op.gather(op.shape_of(ids), op.constant(np.int64(1)), zero)
    positions = op.range(zero, seq, op.constant(np.int64(1)), ov.Type.i64)
    x = op.gather(w("embeddings.word_embeddings.weight"), ids, zero)
    x = op.add(x, op.gather(w("embeddings.position_embeddings.weight"), positions, zero))
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
    return ov.Model(outputs, [ids, types, mask], f"bert-{head}")


def cache_root(base: str | None = None) -> str:
    """Where built graphs live: ``base`` (beside the store) or the user's cache directory."""
    if base:
        return base
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "keymiss", "qa-graphs")


def load_graph(path: str, fingerprint: str, head: str, cache: str | None = None) -> tuple[Any, str]:
    """The OpenVINO model for a checkpoint (from the cache when built before) and the directory it
    is cached in."""
    import openvino as ov

    where = os.path.join(cache_root(cache), f"{fingerprint}-{head}")
    xml = os.path.join(where, "model.xml")
    core = ov.Core()
    if os.path.isfile(xml):
        try:
            return core.read_model(xml), where
        except RuntimeError as exc:  # a torn or foreign file: build it again
            log.warning("rebuilding the cached QA graph %s: %s", xml, exc)
    model = build_bert(path, head)
    try:
        os.makedirs(where, exist_ok=True)
        tmp = os.path.join(where, f"model.{os.getpid()}.xml")
        ov.save_model(model, tmp, compress_to_fp16=False)
        os.replace(tmp[:-4] + ".bin", xml[:-4] + ".bin")
        os.replace(tmp, xml)
    except (OSError, RuntimeError) as exc:  # a read-only cache costs a rebuild per start, not the reader
        log.warning("cannot cache the QA graph in %s: %s", where, exc)
    return model, where


class Compiled:
    """One compiled OpenVINO model and its request: ``run`` feeds numpy arrays, returns numpy arrays."""

    def __init__(self, model: Any, precision: str, threads: int | None = None) -> None:
        import openvino as ov

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
