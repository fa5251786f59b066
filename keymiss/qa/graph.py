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

import hashlib
import json
import logging
import math
import mmap
import os
import struct
import sys
import tempfile
from typing import Any

import numpy as np

from keymiss.errors import ConfigError
from keymiss.qa.footprint import import_openvino

log = logging.getLogger("keymiss.qa")

#: safetensors dtype names -> numpy (BF16 is widened to float32 by hand: numpy has no bfloat16)
_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "BF16": "<u2"}

#: bumped whenever ``build_bert`` writes a different graph: a cached older layout is never read back
GRAPH_VERSION = 5

#: the run-time attribute that keeps a node out of OpenVINO's reduced-precision enforcement (its
#: ``ov::disable_fp16_compression``; the CPU plugin keeps such nodes in float32 under bf16 too). It
#: takes effect when the model is read from IR, which every graph handed to ``Compiled`` is.
PRECISE = "precise_0"


class UnsupportedCheckpoint(ConfigError):
    """The checkpoint is not a plain BERT this builder can write (the torch backend can still run it)."""


class BrokenCheckpoint(UnsupportedCheckpoint):
    """The checkpoint's files are malformed (a torn weights file, a configuration value of the wrong
    type): no backend can run it, so ``auto`` refuses instead of handing it to torch."""


class Mapped:
    """A file mapped copy-on-write (never written): weights read from it cost no copy, and once
    OpenVINO has compiled its own layout of them, ``page_out`` hands the file's pages back, so
    they stop counting in the process's resident memory (a page read again is read back from the
    file as it is then: the file must not be changed in place while it is mapped, see README)."""

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


def _tensor_name(name: str) -> str:
    """Older checkpoints name a LayerNorm's scale and shift gamma and beta: read as weight and bias,
    as transformers renames them on load."""
    if name.endswith("LayerNorm.gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith("LayerNorm.beta"):
        return name[: -len("beta")] + "bias"
    return name


def _is_size(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(file: str) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensor entries of a ``.safetensors`` file (LayerNorm names made current) and the file
    size they were checked against: the header must fit the file, every tensor's bytes lie inside
    it and hold exactly its shape of its dtype. Reads only the header, so ``auto`` can ask it."""

    def broken(what: str) -> BrokenCheckpoint:
        return BrokenCheckpoint(f"{file} is not a valid safetensors file: {what}")

    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise broken(f"{size} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise broken(f"a header of {length} bytes in a file of {size}")
            raw = f.read(length)
    except OSError as exc:
        raise BrokenCheckpoint(f"cannot read {file}: {exc}") from exc
    try:
        header = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError included
        raise broken(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise broken("the header is not a JSON object")
    data = size - 8 - length
    tensors: dict[str, dict[str, Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise broken(f"tensor {name}: entry {info!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPES:
            raise UnsupportedCheckpoint(f"{file}: tensor {name} has dtype {dtype}")
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise broken(f"tensor {name}: shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_size(o) for o in offsets)
            or not offsets[0] <= offsets[1] <= data
        ):
            raise broken(f"tensor {name}: data offsets {offsets!r} outside the {data} data bytes")
        want = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if want != offsets[1] - offsets[0]:
            held = offsets[1] - offsets[0]
            raise broken(
                f"tensor {name}: shape {shape} of {dtype} needs {want} bytes, its offsets hold {held}"
            )
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets, "base": 8 + length}
        tensors[_tensor_name(name)] = entry
    return tensors, size


def read_safetensors(file: str, mapped: Mapped | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as a float32 (or integer) numpy array. Float32
    tensors are read-only maps of the file, not copies: only the pages a forward pass touches
    (the embedding rows of the tokens it sees, say) become resident."""
    header, size = read_header(file)
    whole = (mapped or Mapped(file)).bytes
    if len(whole) != size:
        raise BrokenCheckpoint(f"{file} changed size while it was read ({size} then {len(whole)} bytes)")
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        base = info["base"]
        arr = whole[base + a : base + b].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
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
    be) and then drops the file's pages from this process (they stay in the page cache), so an
    idle reader holds none. A dropped page is read back from the file as it is at the next lookup:
    overwriting the checkpoint in place while it is served mixes two models' rows, and truncating
    it kills the process (SIGBUS); a new checkpoint goes in a new directory (README)."""

    def __init__(self, path: str) -> None:
        file = os.path.join(path, "model.safetensors")
        read_header(file)  # a malformed file is refused before it is mapped
        self.mapped = Mapped(file)
        weights = read_safetensors(file, self.mapped)
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
    # BertConfig's defaults for what config.json may leave out; a value that is there must fit
    for key, default in _SIZES.items():
        value = config.setdefault(key, default)
        if not _is_size(value) or value == 0:  # a reader gives token type 0 at least
            raise BrokenCheckpoint(f"{path}/config.json: {key} is {value!r}, not a positive integer")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise BrokenCheckpoint(f"{path}/config.json: hidden_size is not a multiple of num_attention_heads")
    eps = config.setdefault("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise BrokenCheckpoint(f"{path}/config.json: layer_norm_eps is {eps!r}, not a small positive number")
    return config


#: BertConfig's defaults for the sizes the graph is built from
_SIZES = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "vocab_size": 30522,
}


def tensor_shapes(config: dict[str, Any], head: str) -> dict[str, list[int]]:
    """The tensors ``build_bert`` reads (names without the span checkpoint's ``bert.`` prefix) and
    the shape each must have: the ones transformers would load into the same model."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": [config["vocab_size"], hidden],
        "embeddings.position_embeddings.weight": [config["max_position_embeddings"], hidden],
        "embeddings.token_type_embeddings.weight": [config["type_vocab_size"], hidden],
    }

    def linear(name: str, out: int, into: int) -> None:
        shapes[name + ".weight"], shapes[name + ".bias"] = [out, into], [out]

    def norm(name: str) -> None:
        shapes[name + ".weight"], shapes[name + ".bias"] = [hidden], [hidden]

    norm("embeddings.LayerNorm")
    for i in range(config["num_hidden_layers"]):
        layer = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            linear(layer + "attention.self." + part, hidden, hidden)
        linear(layer + "attention.output.dense", hidden, hidden)
        norm(layer + "attention.output.LayerNorm")
        linear(layer + "intermediate.dense", inner, hidden)
        linear(layer + "output.dense", hidden, inner)
        norm(layer + "output.LayerNorm")
    if head == "span":
        linear("qa_outputs", 2, hidden)
    return shapes


def _prefix(names: Any) -> str:
    # the encoder's tensors carry ``bert.`` in a span checkpoint; its head's do not
    return "bert." if any(k.startswith("bert.") for k in names) else ""


def _full(prefix: str, name: str) -> str:
    return name if name.startswith("qa_outputs") else prefix + name


def check_checkpoint(path: str, head: str) -> dict[str, Any]:
    """The checkpoint's configuration, once its config and its weights' header (not the weights)
    show that ``build_bert`` can write it: every tensor there, of a supported dtype and its shape.
    Raises ``UnsupportedCheckpoint`` (the torch backend may still run it) or ``BrokenCheckpoint``."""
    config = bert_config(path)
    if head == "span" and config["type_vocab_size"] < 2:  # its context's tokens are of type 1
        raise BrokenCheckpoint(f"{path}/config.json: type_vocab_size is 1, the span reader needs 2")
    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise UnsupportedCheckpoint(f"{path!r} has no model.safetensors")
    header = read_header(file)[0]
    prefix = _prefix(header)
    for name, shape in tensor_shapes(config, head).items():
        info = header.get(_full(prefix, name))
        if info is None:
            raise UnsupportedCheckpoint(f"{file}: no tensor {_full(prefix, name)}")
        if info["shape"] != shape:
            raise BrokenCheckpoint(
                f"{file}: tensor {_full(prefix, name)} has shape {info['shape']}, config.json gives {shape}"
            )
    return config


def build_bert(path: str, head: str, mapped: Mapped | None = None) -> Any:
    """The OpenVINO model of a BERT checkpoint: ``head="span"`` outputs start and end logits,
    ``head="encoder"`` the last hidden state. Inputs: inputs_embeds (float32, the word embeddings
    of the ids: see ``WordEmbeddings``), token_type_ids and attention_mask (int64); batch and
    sequence are dynamic."""
    ov = import_openvino()
    import openvino.opset15 as op

    config = check_checkpoint(path, head)
    weights = read_safetensors(os.path.join(path, "model.safetensors"), mapped)
    prefix = _prefix(weights)

    def w(name: str) -> Any:
        # shared: the graph refers to the mapped file instead of holding a copy
        return op.constant(weights[_full(prefix, name)], shared_memory=True)

    eps = float(config["layer_norm_eps"])
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    size = hidden // heads

    def precise(*nodes: Any) -> Any:
        for node in nodes:
            node.get_rt_info()[PRECISE] = ""
        return nodes[-1]

    def linear(x: Any, name: str) -> Any:
        return op.add(op.matmul(x, w(name + ".weight"), False, True), w(name + ".bias"))

    # Under bf16 only the matrix products run in bfloat16: the residual stream, the layer norms and
    # the span head stay float32 (as torch's autocast keeps them), which moves scores far less, so
    # fewer close calls need the float32 settle (``OpenVinoQAModel.settle_margin``)
    def norm(x: Any, name: str) -> Any:
        x = precise(op.mvn(x, op.constant(np.array([-1], dtype=np.int64)), True, eps, "inside_sqrt"))
        return precise(op.add(precise(op.multiply(x, w(name + ".weight"))), w(name + ".bias")))

    def residual(x: Any, into: Any) -> Any:
        return precise(op.add(x, into))

    def split_heads(x: Any) -> Any:
        x = op.reshape(x, op.constant(np.array([0, 0, heads, size], dtype=np.int64)), True)
        return op.transpose(x, op.constant(np.array([0, 2, 1, 3], dtype=np.int64)))

    words = op.parameter([-1, -1, hidden], ov.Type.f32, name="inputs_embeds")
    types = op.parameter([-1, -1], ov.Type.i64, name="token_type_ids")
    mask = op.parameter([-1, -1], ov.Type.i64, name="attention_mask")
    zero = op.constant(np.int64(0))
    seq = op.gather(op.shape_of(mask), op.constant(np.int64(1)), zero)
    positions = op.range(zero, seq, op.constant(np.int64(1)), ov.Type.i64)
    x = residual(words, op.gather(w("embeddings.position_embeddings.weight"), positions, zero))
    x = residual(x, op.gather(w("embeddings.token_type_embeddings.weight"), types, zero))
    x = norm(x, "embeddings.LayerNorm")
    # padding keys get -1e30 (selected: a kept key gets exactly 0): after softmax 0 however far scores
    # spread, as with transformers' float32 minimum (-10000 let padding through), and finite in bf16
    padding = op.unsqueeze(op.equal(mask, zero), op.constant(np.array([1, 2], dtype=np.int64)))
    bias = op.select(padding, op.constant(np.float32(-1e30)), op.constant(np.float32(0.0)))
    scale = op.constant(np.float32(1.0 / np.sqrt(size)))
    for i in range(int(config["num_hidden_layers"])):
        layer = f"encoder.layer.{i}."
        q = split_heads(linear(x, layer + "attention.self.query"))
        k = split_heads(linear(x, layer + "attention.self.key"))
        v = split_heads(linear(x, layer + "attention.self.value"))
        # written out, k's transpose in the product is fused (SDPA left one outside: ~4 % of a pass)
        scores = op.add(op.multiply(op.matmul(q, k, False, True), scale), bias)
        ctx = op.matmul(op.softmax(scores, -1), v, False, False)
        ctx = op.transpose(ctx, op.constant(np.array([0, 2, 1, 3], dtype=np.int64)))
        ctx = op.reshape(ctx, op.constant(np.array([0, 0, hidden], dtype=np.int64)), True)
        x = norm(
            residual(linear(ctx, layer + "attention.output.dense"), x), layer + "attention.output.LayerNorm"
        )
        inner = op.gelu(linear(x, layer + "intermediate.dense"), "erf")
        x = norm(residual(linear(inner, layer + "output.dense"), x), layer + "output.LayerNorm")
    if head == "span":
        head_product = precise(op.matmul(x, w("qa_outputs.weight"), False, True))
        logits = precise(op.add(head_product, w("qa_outputs.bias")))
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


#: beside a cached graph: the SHA-256 of its model.xml and model.bin, written last, checked at load
DIGEST = "model.sha256"


def _digest(xml: bytes, weights: Any) -> str:
    return f"{hashlib.sha256(xml).hexdigest()} {hashlib.sha256(weights).hexdigest()}\n"


def _read_cached(where: str) -> tuple[Any, Mapped]:
    """The graph cached in ``where``, if its files still hash to the digest written with them (a
    torn, truncated or altered entry raises ValueError; one never written, FileNotFoundError).
    What is hashed is what is used: the text read and the very mapping handed to OpenVINO."""
    ov = import_openvino()

    with open(os.path.join(where, DIGEST), encoding="ascii") as f:
        want = f.read()
    with open(os.path.join(where, "model.xml"), "rb") as f:
        xml = f.read()
    weights = Mapped(os.path.join(where, "model.bin"))
    if _digest(xml, weights.map) != want:
        raise ValueError("its files do not match their digest")
    return ov.Core().read_model(xml.decode(), ov.Tensor(weights.bytes, shared_memory=True)), weights


def _write_cached(model: Any, where: str) -> None:
    """Save the graph into ``where``: each file under a temporary name, renamed into place, the
    digest last, so a reader meets a whole entry or one it rebuilds."""
    ov = import_openvino()

    os.makedirs(where, exist_ok=True)
    tmp = os.path.join(where, f"model.{os.getpid()}.xml")
    try:
        ov.save_model(model, tmp, compress_to_fp16=False)
        with open(tmp, "rb") as f:
            xml = f.read()
        with open(tmp[:-4] + ".bin", "rb") as f:
            digest = _digest(xml, f.read())
        with open(tmp[:-4] + ".sha256", "w", encoding="ascii") as f:
            f.write(digest)
        os.replace(tmp[:-4] + ".bin", os.path.join(where, "model.bin"))
        os.replace(tmp, os.path.join(where, "model.xml"))
        os.replace(tmp[:-4] + ".sha256", os.path.join(where, DIGEST))
    finally:
        for leftover in (tmp, tmp[:-4] + ".bin", tmp[:-4] + ".sha256"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def load_graph(path: str, fingerprint: str, head: str, cache: str | None = None) -> tuple[Any, Mapped]:
    """The OpenVINO model for a checkpoint (read back from the cache when built before and still
    whole) and the mapped file its weights live in (``Mapped.page_out`` once it is compiled). A
    missing or bad cache entry is built again and written back."""
    check_checkpoint(path, head)  # a clear error before anything is mapped or built
    where = os.path.join(cache_root(cache), f"{fingerprint}-{head}-v{GRAPH_VERSION}")
    try:
        return _read_cached(where)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, RuntimeError) as exc:  # a torn, altered or foreign entry
        log.warning("rebuilding the cached QA graph in %s: %s", where, exc)
    mapped = Mapped(os.path.join(path, "model.safetensors"))
    model = build_bert(path, head, mapped)
    try:
        _write_cached(model, where)
        # read back: the first start runs what every later one will
        return _read_cached(where)
    except (OSError, ValueError, RuntimeError) as exc:  # a read-only cache costs a build per start
        log.warning("cannot cache the QA graph in %s: %s", where, exc)
    try:  # read back from IR all the same, so its float32 marks hold as they do when cached
        with tempfile.TemporaryDirectory(prefix="keymiss-qa-graph-") as tmp:
            _write_cached(model, tmp)
            return _read_cached(tmp)  # the weights stay mapped after the directory goes
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("QA graph not read back (all of it runs in bfloat16 under bf16): %s", exc)
        return model, mapped


class Compiled:
    """One compiled OpenVINO model and its request: ``run`` feeds numpy arrays, returns numpy arrays."""

    def __init__(self, model: Any, precision: str, mapped: Mapped, threads: int | None = None) -> None:
        ov = import_openvino()

        # the compiled model still reads some constants where the graph left them: keep them mapped
        self.mapped = mapped
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision

    def release(self) -> None:
        """Hand back the graph file's pages first passes read (OpenVINO repacks weights then)."""
        self.mapped.page_out()

    def float32_stream(self) -> bool:
        """Whether the compiled graph keeps its layer norms (and so the residual stream) in float32,
        as the graph's marks ask: read from what OpenVINO runs, not assumed."""
        norms = [
            node.get_rt_info()["runtimePrecision"].value
            for node in self.compiled.get_runtime_model().get_ordered_ops()
            if node.get_rt_info()["layerType"].value == "MVN"
        ]
        return bool(norms) and all(p == "f32" for p in norms)

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(inputs)
        return [np.asarray(result[out], dtype=np.float32) for out in self.compiled.outputs]
