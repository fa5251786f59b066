"""Any local ``transformers`` pipeline as a batched keyspace.

``km.pipeline_keyspace("sentiment:<text>", pipe)`` makes ``GET sentiment:I loved it`` run the
pipeline on ``"I loved it"`` and store its result. Misses that arrive together leave in one
pipeline call of up to ``batch_size`` inputs, one call at a time (a model uses every core it is
given; two calls at once only compete for them), so a burst of misses becomes full batches.

What the key carries:

* a glob (``sentiment:*``): the input is the key after its literal prefix;
* a template with one field (``sentiment:<text>``), or ``<text>`` and ``<text_pair>`` for a
  sentence-pair classifier, or ``<question>`` and ``<context>`` for question answering;
* ``inputs="doc:<sha256>"``: for inputs too long for a key. The key names the SHA-256 of the input
  (``embed:<sha256>``); the input itself is stored beforehand under the ``inputs`` template with a
  plain ``SET doc:<sha256> <text>``. keymiss checks the digest, so one key always means one input
  and a cached result can never belong to a rewritten text.

Values are JSON (numbers as plain floats), or a numpy array for feature extraction; the keyspace's
version is the model's fingerprint (its files, or its weights when it has no directory) with the
task and call options, so a changed model never serves results of the old one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from keymiss.errors import ConfigError, KeymissError
from keymiss.keyspace import Keyspace, Template

if TYPE_CHECKING:
    from keymiss.engine.cache import Keymiss

__all__ = ["add_pipeline_keyspace", "pipeline_fingerprint", "plain"]

_PAIR_FIELDS = {"question-answering": ("question", "context"), "text-classification": ("text", "text_pair")}
_ARRAY_TASKS = ("feature-extraction", "image-feature-extraction")


def plain(value: Any) -> Any:
    """A pipeline's result as JSON-able Python: numpy and torch scalars and arrays become floats,
    ints and lists (a float32 score becomes the double with the same value)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch arrays and scalars
        return plain(value.tolist())
    return value


def pipeline_fingerprint(pipe: Any, call_kwargs: dict[str, Any]) -> str:
    """What the pipeline's results depend on: the task, the call options and the model — its
    files when it was loaded from a directory, otherwise its configuration and weights."""
    h = hashlib.sha256()
    h.update(str(getattr(pipe, "task", type(pipe).__name__)).encode() + b"\0")
    h.update(json.dumps(call_kwargs, sort_keys=True, default=repr).encode() + b"\0")
    model = getattr(pipe, "model", None)
    path = str(getattr(model, "name_or_path", "") or "")
    if path and os.path.isdir(path):
        from keymiss.qa.models import fingerprint

        h.update(b"dir\0" + fingerprint(path).encode())
        return h.hexdigest()[:16]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string().encode())
    if model is not None and hasattr(model, "state_dict"):
        import torch

        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode() + b"\0")
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class _Inputs:
    """Turns a key (or its fields) into the pipeline's input."""

    def __init__(self, task: str, ks_template: Template | None, inputs: str | None) -> None:
        self.task = task
        self.names: tuple[str, ...] = tuple(ks_template.names) if ks_template is not None else ()
        pair = _PAIR_FIELDS.get(task)
        self.pair = pair if pair is not None and set(self.names) == set(pair) else None
        if task == "question-answering" and self.pair is None:
            raise ConfigError("a question-answering pipeline keyspace needs <question> and <context> fields")
        if self.pair is None and len(self.names) > 1:
            raise ConfigError(
                f"a {task} pipeline takes one input: name one field (<text>), not {list(self.names)}"
            )
        self.inputs = Template(inputs) if inputs is not None else None
        if self.inputs is not None and (len(self.names) != 1 or self.inputs.names != list(self.names)):
            field = self.names[0] if len(self.names) == 1 else "sha256"
            raise ConfigError(f"inputs={inputs!r} must use the keyspace's one field, <{field}>")

    async def resolve(self, km: Keymiss, arg: Any, prefix_len: int) -> Any:
        if not self.names:  # a glob: the key after its literal prefix
            return arg[prefix_len:]
        if self.pair is not None:
            a, b = self.pair
            return {a: getattr(arg, a), b: getattr(arg, b)}
        value = getattr(arg, self.names[0])
        if self.inputs is None:
            return value
        digest = value.lower()
        key = self.inputs.literals[0] + value + self.inputs.literals[1]
        item = await km.store.get(key)
        if item is None:
            raise KeymissError(f"no input stored under {key[:200]!r}; SET it first")
        if hashlib.sha256(item.value).hexdigest() != digest:
            raise KeymissError(f"the input under {key[:200]!r} does not have SHA-256 {digest[:64]!r}")
        return item.value.decode("utf-8", "surrogateescape")


def add_pipeline_keyspace(
    km: Keymiss,
    pattern: str,
    pipe: Any,
    *,
    batch_size: int = 8,
    inputs: str | None = None,
    call_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> Keyspace:
    """Register ``pipe`` (a ``transformers.Pipeline``) as the source of ``pattern``'s values; see
    the module's text. ``call_kwargs`` are passed on every call (``top_k=3``); ``options`` are
    the usual keyspace options (``ttl``, ``timeout``, ``stale`` …)."""
    task = str(getattr(pipe, "task", "") or "")
    if not callable(pipe):
        raise ConfigError(f"pipeline_keyspace needs a transformers pipeline, got {type(pipe).__name__}")
    kwargs = dict(call_kwargs or {})
    probe = Keyspace(pattern, lambda *a, **k: None, batch_size=1)  # only to read the pattern
    reader = _Inputs(task, probe.template, inputs)
    prefix_len = len(probe.prefix)
    as_array = task in _ARRAY_TASKS
    options.setdefault("codec", "numpy" if as_array else "json")
    options.setdefault("concurrency", 1)
    options.setdefault("version", pipeline_fingerprint(pipe, kwargs))

    def run(batch: list[Any]) -> list[Any]:
        if reader.pair is not None and task == "question-answering":
            out = pipe(
                question=[x["question"] for x in batch],
                context=[x["context"] for x in batch],
                batch_size=len(batch),
                **kwargs,
            )
            results = out if isinstance(out, list) else [out]  # one input comes back bare
        else:  # a generator: one result per input, however the task shapes a single call's answer
            results = list(pipe((x for x in batch), batch_size=len(batch), **kwargs))
        if as_array:
            import numpy as np

            return [np.asarray(r, dtype=np.float32) for r in results]
        return [plain(r) for r in results]

    async def handler(args: Sequence[Any]) -> list[Any]:
        batch = await asyncio.gather(
            *(reader.resolve(km, a, prefix_len) for a in args), return_exceptions=True
        )
        ready = [x for x in batch if not isinstance(x, BaseException)]
        computed = iter(await asyncio.to_thread(run, ready) if ready else [])
        return [x if isinstance(x, BaseException) else next(computed) for x in batch]

    handler.__qualname__ = f"pipeline[{task or type(pipe).__name__}]"
    return km.add_keyspace(pattern, handler, batch_size=batch_size, **options)
