"""The wire codec: a strict msgpack subset, the versioned envelope, and length-prefix framing.

Sans-IO in the h11 manner: nothing here reads or writes a socket. ``p2p/`` feeds received bytes
into a ``FrameDecoder``, hands each frame to ``decode_envelope``, and sends
``frame(encode_envelope(kind, body))``.

Everything a peer can send is checked here with a ``RemoteProtocolError`` saying what is wrong; no
msgpack, ``ValueError`` or ``RecursionError`` escapes. Things *we* are asked to send that the peer
would reject raise ``LocalProtocolError`` instead. Byte layouts: ``docs/PROTOCOL.md`` section 2.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack

from idlefleet.protocols.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "KINDS",
    "MAX_DEPTH",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "Envelope",
    "FrameDecoder",
    "decode_envelope",
    "encode_envelope",
    "frame",
    "pack",
    "register_kind",
    "unpack",
]

PROTOCOL_VERSION = 1

#: Hard limit on one frame's payload (one encoded envelope), whatever its kind.
MAX_FRAME = 16 * 1024 * 1024

#: Deepest nesting of arrays/maps we accept or send (the envelope map itself is depth 1). Keeps
#: ``repr()`` in a log line, or any recursive walk, from blowing the stack on hostile input.
MAX_DEPTH = 32

_MAX_KIND_LEN = 64

#: Message kind -> largest encoded envelope (bytes) accepted or sent for that kind.
#: Extend with ``register_kind``; never mutate directly.
KINDS: dict[str, int] = {
    "heartbeat": 256,
    "heartbeat_ack": 256,
    "status_request": 256,
    "status_response": 4 * 1024 * 1024,
    "error": 8 * 1024,
}

_HEADER = struct.Struct(">I")
_ENVELOPE_KEYS = frozenset({"v", "k", "b"})


def register_kind(name: str, max_size: int) -> None:
    """Add a message kind with its size limit (bytes of the whole encoded envelope).

    Registering the same name again with the same limit is a no-op; with a different limit, or with
    an invalid name or size, it raises ``LocalProtocolError``.
    """
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_KIND_LEN or not name.isascii():
        raise LocalProtocolError(f"kind name must be 1..{_MAX_KIND_LEN} ASCII chars: {name!r}")
    if type(max_size) is not int or not 0 < max_size <= MAX_FRAME:
        raise LocalProtocolError(f"max_size for {name!r} must be an int in 1..{MAX_FRAME}")
    existing = KINDS.get(name)
    if existing is not None and existing != max_size:
        raise LocalProtocolError(f"kind {name!r} already registered with max_size {existing}")
    KINDS[name] = max_size


# --- strict msgpack ---------------------------------------------------------------------------


class _Reject(ValueError):
    """Raised from inside msgpack hooks; carries a specific message out of the unpacker."""


def _pairs_hook(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise _Reject(f"map key must be a string, got {type(key).__name__}")
        if key in out:
            # Duplicate keys are ambiguous (first-wins vs last-wins differs between libraries), and
            # inside signed bytes that ambiguity is a forgery vector.
            raise _Reject(f"duplicate map key {key!r}")
        out[key] = value
    return out


def _ext_hook(code: int, data: bytes) -> Any:
    raise _Reject(f"msgpack ext type {code} is not allowed")


def _check_decoded(obj: object, what: str) -> None:
    """Reject nesting deeper than MAX_DEPTH and timestamps (iterative: no recursion)."""
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        elif isinstance(item, msgpack.Timestamp):
            # msgpack decodes ext type -1 itself, without calling ext_hook.
            raise RemoteProtocolError(f"{what}: msgpack ext type -1 is not allowed")
        else:
            continue
        if depth > MAX_DEPTH:
            raise RemoteProtocolError(f"{what}: nesting deeper than {MAX_DEPTH}")
        stack.extend((child, depth + 1) for child in children)


def unpack(data: bytes, *, what: str = "message") -> Any:
    """Decode exactly one msgpack object from ``data`` under our strict rules.

    Rules: maps have unique string keys; no ext types (nor timestamps); strings are valid UTF-8;
    nesting at most MAX_DEPTH; no bytes after the object. Returns plain ``None``/``bool``/``int``/
    ``float``/``str``/``bytes``/``list``/``dict``. Raises ``RemoteProtocolError`` naming ``what``.
    """
    n = len(data)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_pairs_hook,
            ext_hook=_ext_hook,
            # No container or string can be longer than the input; bounding every length by it
            # means a forged length header cannot make the unpacker allocate more than ~len(data).
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=n,
        )
    except msgpack.ExtraData:
        raise RemoteProtocolError(f"{what}: trailing bytes after the msgpack object") from None
    except _Reject as e:
        raise RemoteProtocolError(f"{what}: {e}") from None
    except msgpack.StackError:
        raise RemoteProtocolError(f"{what}: nesting too deep") from None
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what}: string is not valid UTF-8") from None
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as e:
        # OutOfData, FormatError, StackError and length-limit errors all land here.
        raise RemoteProtocolError(f"{what}: not valid msgpack ({e})") from None
    _check_decoded(obj, what)
    return obj


def _check_encodable(obj: object) -> None:
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if item is None or isinstance(item, bool | int | float | str | bytes | bytearray):
            continue
        if depth > MAX_DEPTH:
            raise LocalProtocolError(f"nesting deeper than {MAX_DEPTH}")
        if isinstance(item, dict):
            for key, value in item.items():
                if not isinstance(key, str):
                    raise LocalProtocolError(f"map key must be a string, got {key!r}")
                stack.append((value, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)
        else:
            raise LocalProtocolError(f"cannot encode {type(item).__name__} on the wire")


def pack(obj: object) -> bytes:
    """Encode ``obj`` as msgpack (str as str, bytes as bin, float as float64, tuple as array).

    Raises ``LocalProtocolError`` for anything ``unpack`` would refuse (non-string map keys, other
    types, nesting deeper than MAX_DEPTH) or that msgpack cannot represent (ints beyond 64 bits).
    """
    _check_encodable(obj)
    try:
        return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]
    except (ValueError, TypeError, OverflowError) as e:
        raise LocalProtocolError(f"cannot encode: {e}") from None


# --- envelope ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """A decoded envelope: protocol ``version``, message ``kind`` and its ``body`` map."""

    version: int
    kind: str
    body: dict[str, Any]


def encode_envelope(kind: str, body: dict[str, Any]) -> bytes:
    """Encode ``{"v": PROTOCOL_VERSION, "k": kind, "b": body}``.

    Raises ``LocalProtocolError`` if ``kind`` is not registered, ``body`` is not an encodable map,
    or the result exceeds the kind's size limit.
    """
    limit = KINDS.get(kind) if isinstance(kind, str) else None
    if limit is None:
        raise LocalProtocolError(f"unknown message kind {kind!r}")
    if not isinstance(body, dict):
        raise LocalProtocolError(f"body of {kind!r} must be a dict, got {type(body).__name__}")
    data = pack({"v": PROTOCOL_VERSION, "k": kind, "b": body})
    if len(data) > limit:
        raise LocalProtocolError(f"{kind!r} envelope is {len(data)} bytes, limit {limit}")
    return data


def decode_envelope(data: bytes) -> Envelope:
    """Decode and check one envelope (the payload of one frame).

    Raises ``RemoteProtocolError`` with a specific message if the data is oversized for any kind,
    is not msgpack or has trailing bytes, is not a map, lacks or adds top-level keys, carries an
    unknown version or kind, has a body that is not a map, or is larger than its kind allows.
    """
    if len(data) > MAX_FRAME:
        raise RemoteProtocolError(f"envelope is {len(data)} bytes, hard limit {MAX_FRAME}")
    obj = unpack(data, what="envelope")
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"envelope is not a map but {type(obj).__name__}")
    missing = _ENVELOPE_KEYS - obj.keys()
    if missing:
        raise RemoteProtocolError(f"envelope is missing key(s) {sorted(missing)}")
    extra = obj.keys() - _ENVELOPE_KEYS
    if extra:
        raise RemoteProtocolError(f"envelope has unexpected key(s) {sorted(extra)}")
    version, kind, body = obj["v"], obj["k"], obj["b"]
    if type(version) is not int:
        raise RemoteProtocolError(f"envelope version must be an integer, got {version!r}")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"unknown protocol version {version} (we speak {PROTOCOL_VERSION})"
        )
    if not isinstance(kind, str):
        raise RemoteProtocolError(f"envelope kind must be a string, got {type(kind).__name__}")
    limit = KINDS.get(kind)
    if limit is None:
        raise RemoteProtocolError(f"unknown message kind {kind[:_MAX_KIND_LEN]!r}")
    if len(data) > limit:
        raise RemoteProtocolError(f"{kind!r} envelope is {len(data)} bytes, limit {limit}")
    if not isinstance(body, dict):
        raise RemoteProtocolError(f"{kind!r} body is not a map but {type(body).__name__}")
    return Envelope(version=version, kind=kind, body=body)


# --- framing ----------------------------------------------------------------------------------


def frame(payload: bytes, *, max_frame: int = MAX_FRAME) -> bytes:
    """Prefix ``payload`` with its length as a 4-byte big-endian unsigned integer.

    Raises ``LocalProtocolError`` if the payload exceeds ``max_frame``.
    """
    if len(payload) > max_frame:
        raise LocalProtocolError(f"frame payload is {len(payload)} bytes, limit {max_frame}")
    return _HEADER.pack(len(payload)) + bytes(payload)


class FrameDecoder:
    """Splits a byte stream into length-prefixed frames; sans-IO.

    Feed received bytes with ``feed``, pull complete payloads with ``next_frame`` until it returns
    ``None``, and call ``at_eof`` when the stream ends: a peer killed mid-frame looks like a clean
    EOF, so only the decoder can tell the frame was truncated. After it raises, the decoder stays
    broken and raises the same error again: the stream must be dropped.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        if type(max_frame) is not int or not 0 < max_frame <= 2**32 - 1:
            raise LocalProtocolError(f"max_frame must be an int in 1..{2**32 - 1}")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Append received bytes.

        Raises ``RemoteProtocolError`` as soon as the pending frame's header announces more than
        ``max_frame`` bytes, before waiting for (and buffering) its payload.
        """
        self._raise_if_broken()
        self._buf += data
        self._pending_length()

    def next_frame(self) -> bytes | None:
        """Return the next complete payload, or ``None`` if more bytes are needed."""
        self._raise_if_broken()
        length = self._pending_length()
        if length is None or len(self._buf) < _HEADER.size + length:
            return None
        end = _HEADER.size + length
        payload = bytes(self._buf[_HEADER.size : end])
        del self._buf[:end]
        self._pending_length()  # fail fast on an oversized header already buffered behind it
        return payload

    def at_eof(self) -> None:
        """Declare the stream ended; raise ``RemoteProtocolError`` if a frame was cut short.

        Call it after draining ``next_frame``; a complete unread frame is a caller bug
        (``LocalProtocolError``).
        """
        self._raise_if_broken()
        got = len(self._buf)
        if got == 0:
            return
        if got < _HEADER.size:
            self._fail(f"truncated frame: got {got} of {_HEADER.size} header bytes")
        length = _HEADER.unpack_from(self._buf)[0]
        if got - _HEADER.size < length:
            self._fail(f"truncated frame: got {got - _HEADER.size} of {length} bytes")
        raise LocalProtocolError("at_eof() called with a complete frame unread")

    def _pending_length(self) -> int | None:
        if len(self._buf) < _HEADER.size:
            return None
        length: int = _HEADER.unpack_from(self._buf)[0]
        if length > self.max_frame:
            self._fail(f"frame announces {length} bytes, limit {self.max_frame}")
        return length

    def _fail(self, message: str) -> NoReturn:
        self._error = RemoteProtocolError(message)
        self._buf.clear()
        raise self._error

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(str(self._error))
