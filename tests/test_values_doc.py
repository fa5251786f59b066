"""docs/values.md specifies the codecs' bytes: its examples are what the codecs write."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from keymiss.codecs import NUMPY_MAGIC, Codec, CodecError, decode, encode
from keymiss.stores.base import NO_VERSION
from keymiss.valkey import protocol

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


def test_the_companion_example_is_what_a_worker_writes() -> None:
    """A text value computed in an unversioned keyspace: codec 1, its CRC-32, and the 16 zeros
    of no version (what the module writes for a worker's fill: tests/valkey/test_record_format.py
    reads it from a real server)."""
    value, codec = encode("hello")
    example = protocol.companion(int(codec), zlib.crc32(value), NO_VERSION.hex()).decode()
    assert f"`{example}` for the text value `hello` computed in an unversioned" in " ".join(DOC.split())


def test_the_text_codecs_surrogates_are_as_documented() -> None:
    assert encode("a\udcffb") == (b"a\xffb", Codec.TEXT) and "`61 ff 62`" in DOC
    with pytest.raises(CodecError):
        encode("a\ud800b")
