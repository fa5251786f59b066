"""docs/values.md specifies the codecs' bytes: its examples are what the codecs write."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from keymiss.codecs import NUMPY_MAGIC, Codec, decode, encode

DOC = (Path(__file__).parents[1] / "docs" / "values.md").read_text()


def test_the_numpy_example_is_what_the_codec_writes() -> None:
    block = re.search(r"```text\n(.*?)```", DOC, re.S)
    assert block
    data = bytes.fromhex("".join(block.group(1).split()))
    arr = np.array([[1.5, -2, 0.25], [3, 4, 5]], dtype="<f4")
    assert encode(arr) == (data, Codec.NUMPY)
    assert data.startswith(NUMPY_MAGIC) and f"is these {len(data)} bytes" in DOC
    assert np.array_equal(decode(data, Codec.NUMPY), arr)


def test_the_json_example_and_the_tags_are_the_codecs() -> None:
    value, codec = encode({"label": "POSITIVE", "score": 0.98})
    assert codec is Codec.JSON and f"`{value.decode()}`" in DOC and f"the {len(value)} bytes" in DOC
    for codec in Codec:
        assert f"| {int(codec)} | `{codec.name.lower()}` |" in DOC
