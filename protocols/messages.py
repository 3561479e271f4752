"""Typed request/response messages carried in wire envelopes.

Each message is a frozen dataclass that validates itself on construction (``LocalProtocolError``:
we built something invalid) and has a wire ``KIND`` registered in ``wire.KINDS``. ``decode_message``
turns one frame's payload into a message or raises ``RemoteProtocolError`` (the peer sent
something invalid). Which stream protocol carries which message is ``docs/PROTOCOL.md`` section 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from idlefleet.protocols import wire
from idlefleet.protocols.errors import LocalProtocolError, RemoteProtocolError
from idlefleet.protocols.records import MAX_RECORD_SIZE

__all__ = [
    "MAX_ERROR_MESSAGE_LEN",
    "MAX_STATUS_RECORDS",
    "ErrorMessage",
    "Heartbeat",
    "HeartbeatAck",
    "Message",
    "StatusRequest",
    "StatusResponse",
    "decode_message",
    "encode_message",
    "message_from_envelope",
]

MAX_NONCE = 2**64 - 1
#: Most signed records one status response carries (fits the 4 MiB status_response limit).
MAX_STATUS_RECORDS = 1000
MAX_ERROR_CODE_LEN = 64
MAX_ERROR_MESSAGE_LEN = 1024


def _check_nonce(nonce: object) -> None:
    if not isinstance(nonce, int) or isinstance(nonce, bool) or not 0 <= nonce <= MAX_NONCE:
        raise LocalProtocolError(f"nonce must be an int in 0..{MAX_NONCE}")


@dataclass(frozen=True)
class _NonceMessage:
    nonce: int

    def __post_init__(self) -> None:
        _check_nonce(self.nonce)

    def to_body(self) -> dict[str, Any]:
        return {"nonce": self.nonce}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Self:
        return cls(nonce=body["nonce"])


@dataclass(frozen=True)
class Heartbeat(_NonceMessage):
    """Liveness probe; the receiver answers ``HeartbeatAck`` with the same nonce."""

    KIND: ClassVar[str] = "heartbeat"


@dataclass(frozen=True)
class HeartbeatAck(_NonceMessage):
    """Answer to a ``Heartbeat``, echoing its nonce."""

    KIND: ClassVar[str] = "heartbeat_ack"


@dataclass(frozen=True)
class StatusRequest:
    """Ask a node for its current fleet view."""

    KIND: ClassVar[str] = "status_request"

    def to_body(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> StatusRequest:
        return cls()


@dataclass(frozen=True)
class StatusResponse:
    """A node's fleet view: the latest signed record (wire bytes) of every peer it holds alive.

    The receiver validates each record itself with ``records.validate_record``; a relaying node is
    trusted for nothing but liveness.
    """

    KIND: ClassVar[str] = "status_response"
    records: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.records, tuple) or len(self.records) > MAX_STATUS_RECORDS:
            raise LocalProtocolError(f"records must be a tuple of at most {MAX_STATUS_RECORDS}")
        for data in self.records:
            if not isinstance(data, bytes) or len(data) > MAX_RECORD_SIZE:
                raise LocalProtocolError(f"each record must be bytes of at most {MAX_RECORD_SIZE}")

    def to_body(self) -> dict[str, Any]:
        return {"records": list(self.records)}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> StatusResponse:
        records = body["records"]
        if not isinstance(records, list):
            raise LocalProtocolError("records must be an array")
        return cls(records=tuple(records))


@dataclass(frozen=True)
class ErrorMessage:
    """A request was refused; ``code`` is a short machine-readable token, ``message`` for humans."""

    KIND: ClassVar[str] = "error"
    code: str
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not 0 < len(self.code) <= MAX_ERROR_CODE_LEN:
            raise LocalProtocolError(f"code must be 1..{MAX_ERROR_CODE_LEN} chars")
        if not all("a" <= c <= "z" or c == "_" for c in self.code):
            raise LocalProtocolError("code must be lowercase ASCII letters and '_'")
        if not isinstance(self.message, str) or len(self.message) > MAX_ERROR_MESSAGE_LEN:
            raise LocalProtocolError(f"message must be a str of at most {MAX_ERROR_MESSAGE_LEN}")

    def to_body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ErrorMessage:
        return cls(code=body["code"], message=body["message"])


Message = Heartbeat | HeartbeatAck | StatusRequest | StatusResponse | ErrorMessage

_TYPES: dict[str, Any] = {
    cls.KIND: cls for cls in (Heartbeat, HeartbeatAck, StatusRequest, StatusResponse, ErrorMessage)
}
_FIELDS: dict[str, frozenset[str]] = {
    "heartbeat": frozenset({"nonce"}),
    "heartbeat_ack": frozenset({"nonce"}),
    "status_request": frozenset(),
    "status_response": frozenset({"records"}),
    "error": frozenset({"code", "message"}),
}


def encode_message(message: Message) -> bytes:
    """Encode ``message`` as an envelope (not yet framed). Raises ``LocalProtocolError``."""
    return wire.encode_envelope(message.KIND, message.to_body())


def decode_message(data: bytes) -> Message:
    """Decode one frame's payload into a message.

    Raises ``RemoteProtocolError`` if the envelope is invalid, its kind has no message type here,
    or the body's keys or values are wrong.
    """
    return message_from_envelope(wire.decode_envelope(data))


def message_from_envelope(envelope: wire.Envelope) -> Message:
    """The typed message in an already decoded envelope. Raises ``RemoteProtocolError``."""
    cls = _TYPES.get(envelope.kind)
    if cls is None:
        raise RemoteProtocolError(f"no message type for kind {envelope.kind!r}")
    expected = _FIELDS[envelope.kind]
    if envelope.body.keys() != expected:
        raise RemoteProtocolError(
            f"{envelope.kind} body keys {sorted(envelope.body)}, expected {sorted(expected)}"
        )
    try:
        message: Message = cls.from_body(envelope.body)
    except LocalProtocolError as e:
        raise RemoteProtocolError(f"invalid {envelope.kind}: {e}") from None
    return message
