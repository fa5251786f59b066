"""A checkpoint's tokenizer without transformers (whose import pulls in torch): the ``tokenizers``
library over the checkpoint's ``tokenizer.json``, or a WordPiece tokenizer built from ``vocab.txt``
and ``tokenizer_config.json`` the way transformers builds ``BertTokenizer``.

It answers the calls keymiss's readers make of a transformers fast tokenizer (ids, character
offsets, word ids, the special tokens' ids), so a context tokenised by either is the same record.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from keymiss.errors import ConfigError


class Encoded(dict[str, Any]):
    """What a transformers tokenizer call returns, for the fields keymiss reads."""

    def __init__(self, encodings: list[Any], single: bool, offsets: bool) -> None:
        self.encodings = encodings
        pick = (lambda xs: xs[0]) if single else (lambda xs: xs)
        super().__init__(input_ids=pick([e.ids for e in encodings]))
        if offsets:
            self["offset_mapping"] = pick([e.offsets for e in encodings])

    def word_ids(self, index: int = 0) -> list[int | None]:
        return list(self.encodings[index].word_ids)


def _token(value: Any, default: str) -> str:
    if isinstance(value, dict):  # an AddedToken saved as {"content": ...}
        value = value.get("content")
    return str(value) if value else default


def _wordpiece(vocab: str, config: dict[str, Any]) -> Any:
    """BERT's WordPiece tokenizer from ``vocab.txt``, as transformers' ``BertTokenizer`` builds it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    words = WordPiece.read_file(vocab)
    unk = _token(config.get("unk_token"), "[UNK]")
    backend = Backend(WordPiece(words, unk_token=unk))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"),
        # transformers 5's BertTokenizer keeps case unless tokenizer_config.json says otherwise
        lowercase=bool(config.get("do_lower_case", False)),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = [
        _token(config.get(f"{n}_token"), f"[{n.upper()}]") for n in ("unk", "sep", "cls", "pad", "mask")
    ]
    backend.add_special_tokens([t for t in special if t in words])
    sep, cls = special[1], special[2]
    if sep in words and cls in words:
        backend.post_processor = processors.BertProcessing((sep, words[sep]), (cls, words[cls]))
    return backend


def _json(path: str, name: str) -> dict[str, Any]:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file} is not readable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{file} is not a JSON object")
    return value


def _config(path: str) -> dict[str, Any]:
    """``tokenizer_config.json`` with ``special_tokens_map.json`` over it, as transformers 5 merges
    them: the map's tokens win, unless the config lists its ``added_tokens_decoder`` (then the
    map is legacy and ignored)."""
    config = _json(path, "tokenizer_config.json")
    if "added_tokens_decoder" not in config:
        config.update(_json(path, "special_tokens_map.json"))
    return config


class Tokenizer:
    """A checkpoint directory's fast tokenizer, loaded without transformers."""

    is_fast = True

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as Backend

        config = _config(path)
        file = os.path.join(path, "tokenizer.json")
        vocab = os.path.join(path, "vocab.txt")
        if os.path.isfile(file):
            self.backend = Backend.from_file(file)
        elif os.path.isfile(vocab):
            self.backend = _wordpiece(vocab, config)
        else:
            raise ConfigError(f"{path!r} has no tokenizer (tokenizer.json or vocab.txt)")
        # a saved tokenizer.json may carry the training run's truncation and padding: calls decide
        self.backend.no_truncation()
        self.backend.no_padding()
        self.model_max_length = int(config.get("model_max_length") or 512)
        ids = {}
        for name, default in (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]")):
            token = _token(config.get(f"{name}_token"), default)
            ids[name] = self.backend.token_to_id(token)
            if ids[name] is None and name != "pad":
                raise ConfigError(f"{path!r}: the tokenizer has no {token} token")
        self.cls_token_id, self.sep_token_id, self.pad_token_id = ids["cls"], ids["sep"], ids["pad"]

    def __call__(
        self,
        text: str | list[str],
        *,
        add_special_tokens: bool = True,
        return_offsets_mapping: bool = False,
    ) -> Encoded:
        single = isinstance(text, str)
        texts = [text] if isinstance(text, str) else list(text)
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return Encoded(encodings, single, return_offsets_mapping)

    def batch(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Padded ``(input_ids, token_type_ids, attention_mask)`` for single sentences with special
        tokens, each cut to ``max_length`` tokens (as transformers' ``truncation=True`` does)."""
        room = max_length - self.backend.num_special_tokens_to_add(False)
        rows = []
        for enc in self.backend.encode_batch(texts, add_special_tokens=False):
            if len(enc.ids) > room:
                enc.truncate(room)
            rows.append(self.backend.post_process(enc, None, True))
        width = max((len(e.ids) for e in rows), default=0)
        ids = np.full((len(rows), width), self.pad_token_id or 0, dtype=np.int64)
        types = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, enc in enumerate(rows):
            n = len(enc.ids)
            ids[i, :n] = enc.ids
            types[i, :n] = enc.type_ids
            mask[i, :n] = 1
        return ids, types, mask
