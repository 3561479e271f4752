"""protocols.tensors: hidden states to bytes and back, and refusal of bad tensors."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from idlefleet.protocols.errors import LocalProtocolError, TensorError
from idlefleet.protocols.tensors import EncodedTensor, TensorLimits, decode_hidden, encode_hidden

LIMITS = TensorLimits(max_tokens=16, hidden_size=8)


def _x(t: int = 3, h: int = 8) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((t, h)).astype(np.float32) * 5


def _wire(t: EncodedTensor) -> EncodedTensor:
    """Through msgpack, as a peer would receive it."""
    return EncodedTensor.from_dict(msgpack.unpackb(msgpack.packb(t.to_dict())))


def test_fp32_is_exact_through_msgpack() -> None:
    x = _x()
    enc = encode_hidden(x)
    assert enc.dtype == "float32"
    assert enc.nbytes == x.size * 4
    y = decode_hidden(_wire(enc), LIMITS)
    assert y.dtype == np.float32
    assert np.array_equal(x, y)
    y[0, 0] = 1.0  # decoded array is writable and owns its memory


def test_fp16_and_int8_are_close_and_smaller() -> None:
    x = _x()
    f16 = encode_hidden(x, "float16")
    assert f16.nbytes == x.size * 2
    np.testing.assert_allclose(decode_hidden(_wire(f16), LIMITS), x, rtol=1e-3, atol=1e-3)
    i8 = encode_hidden(x, "int8")
    assert i8.nbytes == x.size + 4 * x.shape[0]
    y = decode_hidden(_wire(i8), LIMITS)
    err = np.abs(y - x).max(axis=1)
    assert (err <= np.abs(x).max(axis=1) / 254 + 1e-6).all()  # half a step of the row's scale


def test_int8_zero_row() -> None:
    x = _x()
    x[1] = 0
    assert np.array_equal(decode_hidden(encode_hidden(x, "int8"), LIMITS)[1], np.zeros(8))


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"dtype": "float64"}, "not allowed"),
        ({"dtype": "int8", "data": b"\0" * 24}, "needs per-row scales"),
        ({"data": b"\0" * 95}, "needs 96 bytes, got 95"),
        ({"shape": (3, 8, 1)}, "shape"),
        ({"shape": (3, -8)}, "shape"),
        ({"shape": (3.0, 8)}, "shape"),
        ({"scales": b"\0" * 12}, "must not carry scales"),
        ({"data": "text"}, "bytes"),
    ],
)
def test_bad_encoded_tensor(fields: dict[str, object], reason: str) -> None:
    base: dict[str, object] = {"dtype": "float32", "shape": (3, 8), "data": b"\0" * 96}
    with pytest.raises(TensorError, match=reason):
        EncodedTensor(**(base | fields))  # type: ignore[arg-type]


def test_bad_int8_scales() -> None:
    with pytest.raises(TensorError, match="scales need 12 bytes"):
        EncodedTensor("int8", (3, 8), b"\0" * 24, b"\0" * 8)
    bad = EncodedTensor("int8", (3, 8), b"\1" * 24, np.array([1, -1, 1], "<f4").tobytes())
    with pytest.raises(TensorError, match="non-negative"):
        decode_hidden(bad, LIMITS)


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ([1, 2], "map"),
        ({"dtype": "float32", "shape": [1, 8]}, "data"),
        ({"dtype": 1, "shape": [1, 8], "data": b""}, "dtype"),
        ({"dtype": "float32", "shape": 8, "data": b""}, "shape"),
        ({"dtype": "float32", "shape": [1, 8], "data": b"\0" * 32, "x": 1}, "unknown"),
    ],
)
def test_bad_dict(obj: object, reason: str) -> None:
    with pytest.raises(TensorError, match=reason):
        EncodedTensor.from_dict(obj)


@pytest.mark.parametrize(
    ("shape", "reason"),
    [((17, 8), "token count 17"), ((0, 8), "token count 0"), ((2, 9), "hidden size 9")],
)
def test_limits(shape: tuple[int, int], reason: str) -> None:
    enc = encode_hidden(np.zeros(shape, np.float32))
    with pytest.raises(TensorError, match=reason):
        decode_hidden(enc, LIMITS)


def test_non_finite_refused() -> None:
    x = _x()
    x[0, 0] = np.nan
    with pytest.raises(LocalProtocolError, match="NaN"):
        encode_hidden(x)
    raw = EncodedTensor("float32", (3, 8), x.tobytes())  # a peer that does not check
    with pytest.raises(TensorError, match="NaN"):
        decode_hidden(raw, LIMITS)


def test_encode_refuses_bad_input() -> None:
    with pytest.raises(LocalProtocolError, match="float16 range"):
        encode_hidden(np.full((1, 8), 1e6, np.float32), "float16")
    with pytest.raises(LocalProtocolError, match="not allowed"):
        encode_hidden(_x(), "bfloat16")
    with pytest.raises(LocalProtocolError, match="expected float"):
        encode_hidden(np.zeros(8, np.float32))
