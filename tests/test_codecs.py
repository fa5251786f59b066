"""Values ↔ bytes: what a Redis client sees, exact round trips, and no path to code execution."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import numpy as np
import pytest

from keymiss.codecs import Codec, CodecError, decode, encode


def test_text_is_plain_utf8() -> None:
    data, codec = encode("héllo")
    assert data == "héllo".encode() and codec is Codec.TEXT
    assert decode(data, codec) == "héllo"


def test_bytes_are_stored_as_is() -> None:
    assert encode(b"\x00\x01") == (b"\x00\x01", Codec.BYTES)


def test_json_for_structures_is_compact_json() -> None:
    data, codec = encode({"answer": "ribosomes", "score": 0.5})
    assert codec is Codec.JSON
    assert data == b'{"answer":"ribosomes","score":0.5}'
    assert decode(data, codec) == {"answer": "ribosomes", "score": 0.5}


def test_numbers_and_none_are_json() -> None:
    for value in (42, 1.5, True, None, [1, "a"]):
        data, codec = encode(value)
        assert codec is Codec.JSON and decode(data, codec) == value


@pytest.mark.parametrize("dtype", ["float32", "int64", "uint8", "float16", "bool"])
def test_numpy_round_trip(dtype: str) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    data, codec = encode(arr)
    assert codec is Codec.NUMPY
    out = decode(data, codec)
    assert out.dtype == arr.dtype and out.shape == arr.shape and np.array_equal(out, arr)


def test_a_0_d_array_is_stored_with_shape_empty_and_an_older_1_value_still_reads() -> None:
    data, codec = encode(np.array(3.25))
    assert b'"shape":[]' in data  # docs/values.md: [] for a scalar
    out = decode(data, codec)
    assert out.shape == () and out == 3.25
    header = b'{"dtype":"<f8","shape":[1]}'  # what an earlier release stored stays readable
    older = b"KMNDARR1" + len(header).to_bytes(2, "little") + header + np.float64(3.25).tobytes()
    assert decode(older, codec).shape == (1,)


def test_numpy_object_arrays_refused() -> None:
    with pytest.raises(CodecError, match="pickle"):
        encode(np.array([object()], dtype=object))


def test_numpy_header_cannot_smuggle_object_dtype() -> None:
    forged = b"KMNDARR1" + (26).to_bytes(2, "little") + b'{"dtype":"|O","shape":[1]}' + b"\x00" * 8
    with pytest.raises(CodecError):
        decode(forged, Codec.NUMPY)


def test_truncated_numpy_body_rejected() -> None:
    data, _ = encode(np.zeros(10, dtype="float32"))
    with pytest.raises(CodecError, match="bytes"):
        decode(data[:-3], Codec.NUMPY)


def test_unencodable_values_give_clear_errors() -> None:
    with pytest.raises(CodecError, match="cannot store a object"):
        encode(object())
    with pytest.raises(CodecError):
        encode({"x": float("nan")})
    with pytest.raises(CodecError, match="needs str"):
        encode(b"raw", Codec.TEXT)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, ("open(__import__('os').environ['KM_MARKER'], 'w').write('pwned')",))


@pytest.mark.parametrize("codec", list(Codec))
def test_pickle_payload_is_never_executed(
    codec: Codec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv("KM_MARKER", str(marker))
    payload = pickle.dumps(_Boom())
    with contextlib.suppress(CodecError):
        decode(payload, codec)
    assert not marker.exists()


def test_invalid_json_is_a_codec_error() -> None:
    with pytest.raises(CodecError):
        decode(b"\xff{not json", Codec.JSON)


@pytest.mark.parametrize(
    "data, codec",
    [
        (b"[" * 100_000 + b"]" * 100_000, Codec.JSON),  # nested past the recursion limit
        (b"KMNDARR1" + b"\x02\x00" + b"{}", Codec.NUMPY),  # a header without dtype
        (b"KMNDARR1" + b"\x02\x00" + b"[]", Codec.NUMPY),  # a header that is not an object
        (b"KMNDARR1" + b"\x0f\x00" + b'{"dtype":"<f4"}', Codec.NUMPY),  # no shape
    ],
)
def test_forged_bytes_are_a_codec_error_not_a_crash(data: bytes, codec: Codec) -> None:
    # whoever can write the store writes these bytes: a reader gets CodecError (and recomputes)
    with pytest.raises(CodecError):
        decode(data, codec)
