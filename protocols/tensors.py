"""Hidden states on the wire: ndarray <-> ``{dtype, shape, data[, scales]}``.

Pure functions and frozen dataclasses, no I/O. A hidden state is a float32 array
``[tokens, hidden]``; it travels as one of three encodings:

- ``float32``: exact (the default), 4 bytes per value;
- ``float16``: 2 bytes per value, ~3 significant digits;
- ``int8``: 1 byte per value plus one float32 scale per row (``x ~= q * scale``).

All multi-byte values are little-endian. Everything decoded from a peer is checked against the
allowed dtypes, rank, :class:`TensorLimits` and the exact byte length, and is refused with a
:class:`~protocols.errors.RemoteTensorError` that says why; a tensor we build ourselves that breaks
the same rules raises :class:`~protocols.errors.LocalTensorError` (both are a ``TensorError``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from idlefleet.protocols.errors import LocalTensorError, RemoteTensorError, peer_input

FLOAT32: Final = "float32"
FLOAT16: Final = "float16"
INT8: Final = "int8"
WIRE_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    FLOAT32: np.dtype("<f4"),
    FLOAT16: np.dtype("<f2"),
    INT8: np.dtype("i1"),
}
_SCALE_DTYPE: Final = np.dtype("<f4")
_F16_MAX: Final = float(np.finfo(np.float16).max)
RANK: Final = 2  # hidden states are always [tokens, hidden]


@dataclass(frozen=True)
class TensorLimits:
    """What a receiver accepts: at most ``max_tokens`` rows of exactly ``hidden_size`` columns."""

    max_tokens: int = 8192
    hidden_size: int | None = None  # None: any width up to max_hidden
    max_hidden: int = 16384

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`RemoteTensorError` unless ``shape`` is an acceptable ``[tokens, hidden]``
        (the receiver's check of a peer's tensor)."""
        if len(shape) != RANK:
            raise RemoteTensorError(f"hidden state must have rank {RANK} [tokens, hidden], got {shape}")
        tokens, hidden = shape
        if not 1 <= tokens <= self.max_tokens:
            raise RemoteTensorError(f"token count {tokens} outside [1, {self.max_tokens}]")
        if self.hidden_size is not None and hidden != self.hidden_size:
            raise RemoteTensorError(f"hidden size {hidden} != model hidden size {self.hidden_size}")
        if not 1 <= hidden <= self.max_hidden:
            raise RemoteTensorError(f"hidden size {hidden} outside [1, {self.max_hidden}]")


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor as it travels: dtype name, shape, raw little-endian bytes, int8 row scales.

    Construction checks that dtype is allowed, the shape is a rank-2 tuple of non-negative ints
    and that ``data`` (and ``scales`` for int8) have exactly the right length; otherwise it
    raises :class:`LocalTensorError` (:meth:`from_dict`, reading a peer's, raises the remote one).
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes
    scales: bytes | None = None

    def __post_init__(self) -> None:
        if self.dtype not in WIRE_DTYPES:
            raise LocalTensorError(f"dtype {self.dtype!r} not allowed (allowed: {sorted(WIRE_DTYPES)})")
        if (
            not isinstance(self.shape, tuple)
            or len(self.shape) != RANK
            or not all(type(d) is int and d >= 0 for d in self.shape)
        ):
            raise LocalTensorError(f"shape must be {RANK} non-negative ints, got {self.shape!r}")
        if not isinstance(self.data, bytes):
            raise LocalTensorError(f"data must be bytes, got {type(self.data).__name__}")
        expected = math.prod(self.shape) * WIRE_DTYPES[self.dtype].itemsize
        if len(self.data) != expected:
            raise LocalTensorError(
                f"{self.dtype}{list(self.shape)} needs {expected} bytes, got {len(self.data)}")
        if self.dtype == INT8:
            if not isinstance(self.scales, bytes):
                raise LocalTensorError("int8 tensor needs per-row scales (bytes)")
            want = self.shape[0] * _SCALE_DTYPE.itemsize
            if len(self.scales) != want:
                raise LocalTensorError(f"int8 scales need {want} bytes, got {len(self.scales)}")
        elif self.scales is not None:
            raise LocalTensorError(f"{self.dtype} tensor must not carry scales")

    @property
    def nbytes(self) -> int:
        """Payload size on the wire (data plus scales)."""
        return len(self.data) + (len(self.scales) if self.scales is not None else 0)

    def to_dict(self) -> dict[str, Any]:
        """msgpack-friendly form: ``{"dtype", "shape", "data"[, "scales"]}``."""
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape), "data": self.data}
        if self.scales is not None:
            out["scales"] = self.scales
        return out

    @classmethod
    def from_dict(cls, obj: object) -> EncodedTensor:
        """Parse :meth:`to_dict` output received from a peer; raises :class:`RemoteTensorError`."""
        if not isinstance(obj, dict):
            raise RemoteTensorError(f"tensor must be a map, got {type(obj).__name__}")
        unknown = set(obj) - {"dtype", "shape", "data", "scales"}
        if unknown:
            raise RemoteTensorError(f"unknown tensor fields {sorted(map(str, unknown))}")
        dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
        if not isinstance(dtype, str):
            raise RemoteTensorError("tensor dtype missing or not a string")
        if not isinstance(shape, list | tuple):
            raise RemoteTensorError("tensor shape missing or not a list")
        if not isinstance(data, bytes):
            raise RemoteTensorError("tensor data missing or not bytes")
        scales = obj.get("scales")
        if scales is not None and not isinstance(scales, bytes):
            raise RemoteTensorError("tensor scales must be bytes")
        with peer_input():  # the constructor checks the peer's fields
            return cls(dtype=dtype, shape=tuple(shape), data=data, scales=scales)


def encode_hidden(x: npt.ArrayLike, dtype: str = FLOAT32) -> EncodedTensor:
    """Encode a float32 ``[tokens, hidden]`` array for the wire.

    Raises :class:`LocalTensorError` if ``x`` is not a finite rank-2 float array, if ``dtype``
    is unknown, or if a value does not fit in float16.
    """
    arr = np.asarray(x)
    if arr.ndim != RANK or arr.dtype.kind != "f":
        raise LocalTensorError(f"expected float [tokens, hidden], got {arr.dtype}{arr.shape}")
    if not np.isfinite(arr).all():
        raise LocalTensorError("refusing to encode a hidden state with NaN or inf")
    shape = (int(arr.shape[0]), int(arr.shape[1]))
    if dtype == FLOAT32:
        return EncodedTensor(FLOAT32, shape, arr.astype("<f4", copy=False).tobytes())
    if dtype == FLOAT16:
        if arr.size and float(np.abs(arr).max()) > _F16_MAX:
            raise LocalTensorError("hidden state exceeds the float16 range; send float32")
        return EncodedTensor(FLOAT16, shape, arr.astype("<f2").tobytes())
    if dtype == INT8:
        q, scales = _quantize_rows(arr.astype(np.float32, copy=False))
        return EncodedTensor(INT8, shape, q.tobytes(), scales.astype("<f4").tobytes())
    raise LocalTensorError(f"dtype {dtype!r} not allowed (allowed: {sorted(WIRE_DTYPES)})")


def decode_hidden(t: EncodedTensor, limits: TensorLimits) -> npt.NDArray[np.float32]:
    """Decode to a fresh, writable float32 ``[tokens, hidden]`` array.

    Raises :class:`RemoteTensorError` if the shape breaks ``limits`` or a decoded value is not finite
    (including int8 values whose ``q x scale`` overflows float32).
    """
    limits.check_shape(t.shape)
    raw = np.frombuffer(t.data, dtype=WIRE_DTYPES[t.dtype]).reshape(t.shape)
    out = raw.astype(np.float32)  # always a copy: the result owns its memory
    if t.dtype == INT8:
        if t.scales is None:  # unreachable: EncodedTensor checks it; keeps mypy honest
            raise RemoteTensorError("int8 tensor needs per-row scales")
        scales = np.frombuffer(t.scales, dtype=_SCALE_DTYPE).astype(np.float32)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise RemoteTensorError("int8 scales must be finite and non-negative")
        with np.errstate(over="ignore"):  # q x scale may overflow float32: caught just below
            out *= scales[:, None]
    if not np.isfinite(out).all():
        # For int8 a finite scale times q can still overflow (127 x 3e38): the decoded values,
        # not just the wire fields, must be finite.
        raise RemoteTensorError("hidden state contains NaN or inf")
    return out


def _quantize_rows(
    x: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Symmetric per-row int8: ``scale = max|row| / 127``, ``q = round(x / scale)``."""
    amax = np.abs(x).max(axis=1) if x.size else np.zeros(x.shape[0], np.float32)
    scales = (amax / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return q, scales
