"""The pipeline session protocol, sans-IO: message kinds, parsing, and the per-session state machine.

One libp2p stream on ``/idlefleet/stage/1.0.0`` carries one session between a client and a stage
server (a peer hosting a block range). The client opens it for a model id, a block range and a
maximum length, then sends ``step`` messages (hidden states for consecutive positions) and gets the
blocks' output back for each, and finally closes it. The server keeps one KV cache per session.

Transitions (anything else is a ``RemoteProtocolError`` naming the state and kind)::

    state          received          -> state     reply
    AWAIT_OPEN     session_open      -> OPEN      session_opened | error (session stays AWAIT_OPEN)
    OPEN           step              -> OPEN      step_result | error
    OPEN           receipt_proposal  -> CLOSING   receipt | error (no receipt: the client may still close)
    OPEN           session_close     -> CLOSED    session_closed
    CLOSING        session_close     -> CLOSED    session_closed
    CLOSING        receipt_proposal  -> CLOSED    error duplicate_receipt (one receipt per session)

The receipt exchange (``receipt_proposal`` / ``receipt``) is checked by ``protocols.receipts``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from idlefleet.protocols import wire
from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.tensors import WIRE_DTYPES, EncodedTensor

STAGE_PROTOCOL = "/idlefleet/stage/1.0.0"
MAX_MODEL_ID_LEN = 128
MAX_LENGTH_LIMIT = 1 << 20

# Error codes a stage server replies with (``error`` envelope, ``code`` field).
ERR_WRONG_MODEL = "wrong_model"  # not the model this server hosts
ERR_WRONG_BLOCKS = "wrong_blocks"  # range not within the hosted blocks
ERR_BUSY = "busy"  # session limit or KV-cache memory budget reached
ERR_DRAINING = "draining"  # shutting down or about to drive: no new sessions
ERR_BAD_TENSOR = "bad_tensor"  # wrong dtype, shape, byte length or values
ERR_BAD_POSITION = "bad_position"  # skips ahead of the cache or past max_length
ERR_IDLE = "idle_timeout"  # no message within the idle timeout: session freed
ERR_BAD_REQUEST = "bad_request"  # anything else malformed
# Receipt exchange at the end of a session (protocols.receipts; PROTOCOL.md 6.3 and 7.3).
ERR_BAD_RECEIPT = "bad_receipt"  # malformed proposal, wrong parties, bad client signature
ERR_RECEIPT_MISMATCH = "receipt_mismatch"  # disagrees with the server's own count of the session
ERR_DUPLICATE_RECEIPT = "duplicate_receipt"  # a second proposal in one session
ERR_NO_RECEIPTS = "receipts_unsupported"  # this server keeps no ledger: it signs no receipts

for _kind, _size in (("session_open", 1024), ("session_opened", 1024), ("session_close", 256),
                     ("session_closed", 256), ("step", wire.MAX_FRAME), ("step_result", wire.MAX_FRAME),
                     ("receipt_proposal", 2048), ("receipt", 4096)):
    wire.register_kind(_kind, _size)


class SessionState(enum.Enum):
    AWAIT_OPEN = "await_open"
    OPEN = "open"
    CLOSING = "closing"  # a receipt was proposed: only session_close may follow
    CLOSED = "closed"


TRANSITIONS: dict[tuple[SessionState, str], SessionState] = {
    (SessionState.AWAIT_OPEN, "session_open"): SessionState.OPEN,
    (SessionState.OPEN, "step"): SessionState.OPEN,
    (SessionState.OPEN, "receipt_proposal"): SessionState.CLOSING,
    (SessionState.OPEN, "session_close"): SessionState.CLOSED,
    (SessionState.CLOSING, "session_close"): SessionState.CLOSED,
    (SessionState.CLOSING, "receipt_proposal"): SessionState.CLOSED,  # refused: duplicate_receipt
}


class SessionMachine:
    """Tracks one session's state; ``receive(kind)`` validates a transition before it is acted on.

    A rejected ``session_open`` (``fail_open``) leaves the machine in AWAIT_OPEN so the client may
    retry on the same stream; a server that refuses may also just close it.
    """

    def __init__(self) -> None:
        self.state = SessionState.AWAIT_OPEN

    def receive(self, kind: str) -> SessionState:
        nxt = TRANSITIONS.get((self.state, kind))
        if nxt is None:
            raise RemoteProtocolError(f"unexpected {kind!r} in session state {self.state.value}")
        self.state = nxt
        return nxt

    def fail_open(self) -> None:
        if self.state is SessionState.OPEN:
            self.state = SessionState.AWAIT_OPEN


_OPEN_FIELDS = frozenset({"model_id", "start", "end", "max_length", "dtype"})


@dataclass(frozen=True)
class OpenRequest:
    model_id: str
    start: int
    end: int
    max_length: int
    dtype: str = "float32"  # encoding of hidden states in both directions

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not 0 < len(self.model_id) <= MAX_MODEL_ID_LEN:
            raise RemoteProtocolError("session_open: model_id must be a non-empty string ≤ 128 chars")
        for name in ("start", "end", "max_length"):
            if type(getattr(self, name)) is not int:
                raise RemoteProtocolError(f"session_open: {name} must be an integer")
        if not 0 <= self.start < self.end:
            raise RemoteProtocolError(f"session_open: bad block range [{self.start}, {self.end})")
        if not 0 < self.max_length <= MAX_LENGTH_LIMIT:
            raise RemoteProtocolError(f"session_open: max_length must be in [1, {MAX_LENGTH_LIMIT}]")
        # isinstance first: an unhashable value (a list) must not reach the dict lookup.
        if not isinstance(self.dtype, str) or self.dtype not in WIRE_DTYPES:
            raise RemoteProtocolError(f"session_open: dtype must be one of {sorted(WIRE_DTYPES)}")

    def to_body(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "start": self.start, "end": self.end,
                "max_length": self.max_length, "dtype": self.dtype}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> OpenRequest:
        """Parse a peer's ``session_open`` body; every field's type is checked by the constructor.

        Raises RemoteProtocolError for a missing or unknown field or a value of the wrong type.
        """
        missing = _OPEN_FIELDS - {"dtype"} - body.keys()
        if missing:
            raise RemoteProtocolError(f"session_open: missing field(s) {sorted(missing)}")
        extra = body.keys() - _OPEN_FIELDS
        if extra:
            raise RemoteProtocolError(f"session_open: unknown field(s) {sorted(extra)[:8]}")
        return cls(body["model_id"], body["start"], body["end"], body["max_length"],
                   body.get("dtype", "float32"))


@dataclass(frozen=True)
class Step:
    """Hidden states for positions ``position .. position + tokens - 1``."""

    position: int
    hidden: EncodedTensor

    def __post_init__(self) -> None:
        if type(self.position) is not int or not 0 <= self.position < MAX_LENGTH_LIMIT:
            raise RemoteProtocolError("step: position must be a non-negative integer")

    def to_body(self) -> dict[str, Any]:
        return {"position": self.position, "hidden": self.hidden.to_dict()}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Step:
        """Parse a step; raises RemoteProtocolError (TensorError for the tensor part)."""
        if "position" not in body or "hidden" not in body:
            raise RemoteProtocolError("step: needs position and hidden")
        extra = body.keys() - {"position", "hidden"}
        if extra:
            raise RemoteProtocolError(f"step: unknown field(s) {sorted(extra)[:8]}")
        return cls(body["position"], EncodedTensor.from_dict(body["hidden"]))


@dataclass(frozen=True)
class StepResult:
    position: int
    hidden: EncodedTensor
    draining: bool = False  # the server asks the client to move this session elsewhere
    # The server's Ed25519 signature over the step's commitment (protocols.verification,
    # docs/PROTOCOL.md 7.2); None only from a server without an identity (never on the wire today).
    sig: bytes | None = None

    def to_body(self) -> dict[str, Any]:
        body = {"position": self.position, "hidden": self.hidden.to_dict(), "draining": self.draining}
        if self.sig is not None:
            body["sig"] = self.sig
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> StepResult:
        """Raises RemoteProtocolError (TensorError for the tensor); an absent ``sig`` is None
        here, and the client decides whether that is a fault."""
        position, draining, sig = body.get("position"), body.get("draining", False), body.get("sig")
        if type(position) is not int or not isinstance(draining, bool):
            raise RemoteProtocolError("step_result: bad position or draining flag")
        if sig is not None and not (isinstance(sig, bytes) and len(sig) == 64):
            raise RemoteProtocolError("step_result: sig must be 64 bytes")
        return cls(position, EncodedTensor.from_dict(body.get("hidden")), draining, sig)
