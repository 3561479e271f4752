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

Chaining: a ``step`` with a ``chain`` gets no ``step_result``; the server forwards a ``relay_step``
to the next hop on ``RELAY_PROTOCOL`` (no reply on that stream), and the last hop sends
``chain_result`` on its own session's stream. A hop that cannot compute or forward a chained step
sends ``chain_failed`` on its own session's stream. Both arrive unasked: a client that stopped
waiting for them skips them (they name their ``seq``).

Errors say whose fault (``protocols.errors``): building a message raises ``LocalProtocolError``;
``from_body``, reading a peer's, raises ``RemoteProtocolError`` (``RemoteTensorError`` for a tensor).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from idlefleet.protocols import wire
from idlefleet.protocols.errors import LocalProtocolError, ProtocolError, RemoteProtocolError, peer_input
from idlefleet.protocols.tensors import WIRE_DTYPES, EncodedTensor

STAGE_PROTOCOL = "/idlefleet/stage/1.0.0"
# Server-to-server chaining (docs/PROTOCOL.md 6.5): a stage server forwards a chained step's output
# straight to the next hop's server on this protocol, instead of returning it to the client. 1.1.0
# adds ``relay_steps``, several relayed steps in one frame (a batch computed together goes on
# together); a sender falls back to 1.0.0, one ``relay_step`` per frame, for a peer without it.
RELAY_PROTOCOL = "/idlefleet/relay/1.1.0"
RELAY_PROTOCOL_1_0 = "/idlefleet/relay/1.0.0"
RELAY_BATCH_MAX = 32  # relayed steps in one relay_steps frame
MAX_MODEL_ID_LEN = 128
MAX_CHAIN = 8  # hops a chained step may still travel after the first
CHAIN_MAX_ROWS = 8  # a chained step carries at most this many positions (decode, not prefill)
RELAY_TOKEN_LEN = 16  # the capability a session's client hands to the hop before it
MAX_PEER_ID_LEN = 128
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
                     ("receipt_proposal", 2048), ("receipt", 4096), ("relay_step", wire.MAX_FRAME),
                     ("chain_result", wire.MAX_FRAME), ("chain_failed", 1024),
                     ("relay_steps", wire.MAX_FRAME)):
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
            raise LocalProtocolError("session_open: model_id must be a non-empty string ≤ 128 chars")
        for name in ("start", "end", "max_length"):
            if type(getattr(self, name)) is not int:
                raise LocalProtocolError(f"session_open: {name} must be an integer")
        if not 0 <= self.start < self.end:
            raise LocalProtocolError(f"session_open: bad block range [{self.start}, {self.end})")
        if not 0 < self.max_length <= MAX_LENGTH_LIMIT:
            raise LocalProtocolError(f"session_open: max_length must be in [1, {MAX_LENGTH_LIMIT}]")
        # isinstance first: an unhashable value (a list) must not reach the dict lookup.
        if not isinstance(self.dtype, str) or self.dtype not in WIRE_DTYPES:
            raise LocalProtocolError(f"session_open: dtype must be one of {sorted(WIRE_DTYPES)}")

    def to_body(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "start": self.start, "end": self.end,
                "max_length": self.max_length, "dtype": self.dtype}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> OpenRequest:
        """Parse a peer's ``session_open`` body; every field's type is checked by the constructor.

        Raises RemoteProtocolError for a missing or unknown field or a value of the wrong type
        (the constructor alone raises LocalProtocolError: the request would be ours).
        """
        missing = _OPEN_FIELDS - {"dtype"} - body.keys()
        if missing:
            raise RemoteProtocolError(f"session_open: missing field(s) {sorted(missing)}")
        extra = body.keys() - _OPEN_FIELDS
        if extra:
            raise RemoteProtocolError(f"session_open: unknown field(s) {sorted(extra)[:8]}")
        with peer_input():
            return cls(body["model_id"], body["start"], body["end"], body["max_length"],
                       body.get("dtype", "float32"))


def _check_int(what: str, value: object, limit: int,
               error: type[ProtocolError] = LocalProtocolError) -> int:
    """``value`` if it is an int in [0, limit); else ``error`` (local: a constructor's check)."""
    if type(value) is not int or not 0 <= value < limit:
        raise error(f"{what} must be an integer in [0, {limit})")
    return value


@dataclass(frozen=True)
class ChainHop:
    """A hop a chained step is forwarded to: the server ``peer``, its session number with the
    client, and the relay token that session's ``session_opened`` gave the client."""

    peer: str
    session: int
    relay: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.peer, str) or not 0 < len(self.peer) <= MAX_PEER_ID_LEN:
            raise LocalProtocolError("chain: peer must be a peer id string")
        _check_int("chain: session", self.session, 2**63)
        if not isinstance(self.relay, bytes) or len(self.relay) != RELAY_TOKEN_LEN:
            raise LocalProtocolError(f"chain: relay must be {RELAY_TOKEN_LEN} bytes")

    def to_body(self) -> dict[str, Any]:
        return {"peer": self.peer, "session": self.session, "relay": self.relay}

    @classmethod
    def from_body(cls, body: object) -> ChainHop:
        if not isinstance(body, dict) or set(body) != {"peer", "session", "relay"}:
            raise RemoteProtocolError("chain: each hop needs exactly peer, session and relay")
        with peer_input():
            return cls(body["peer"], body["session"], body["relay"])


def _parse_chain(value: object, *, allow_empty: bool) -> tuple[ChainHop, ...]:
    if not isinstance(value, list) or len(value) > MAX_CHAIN or (not value and not allow_empty):
        raise RemoteProtocolError(f"chain must be a list of {0 if allow_empty else 1}..{MAX_CHAIN} hops")
    return tuple(ChainHop.from_body(h) for h in value)


@dataclass(frozen=True)
class Step:
    """Hidden states for positions ``position .. position + tokens - 1``.

    ``chain`` (a chained step, at most ``CHAIN_MAX_ROWS`` rows): instead of a ``step_result``, the
    server forwards its output to ``chain[0]`` on ``RELAY_PROTOCOL`` (``RelayStep``), and the last
    hop returns every hop's output to the client (``ChainResult``). ``seq`` numbers the client's
    chained steps; ``fence`` (on a step that is not chained) tells the server to drop any relayed
    step numbered ``fence`` or lower that is still on its way (the client gave up on it)."""

    position: int
    hidden: EncodedTensor
    chain: tuple[ChainHop, ...] = ()
    seq: int = 0
    fence: int = 0

    def __post_init__(self) -> None:
        if type(self.position) is not int or not 0 <= self.position < MAX_LENGTH_LIMIT:
            raise LocalProtocolError("step: position must be a non-negative integer")
        _check_int("step: seq", self.seq, 2**63)
        _check_int("step: fence", self.fence, 2**63)
        if self.chain and not 0 < self.hidden.shape[0] <= CHAIN_MAX_ROWS:
            raise LocalProtocolError(f"step: a chained step carries 1..{CHAIN_MAX_ROWS} rows")
        if self.chain and not self.seq:
            raise LocalProtocolError("step: a chained step needs a seq")

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"position": self.position, "hidden": self.hidden.to_dict()}
        if self.chain:
            body["chain"] = [h.to_body() for h in self.chain]
            body["seq"] = self.seq
        if self.fence:
            body["fence"] = self.fence
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Step:
        """Parse a step; raises RemoteProtocolError (RemoteTensorError for the tensor part)."""
        if "position" not in body or "hidden" not in body:
            raise RemoteProtocolError("step: needs position and hidden")
        extra = body.keys() - {"position", "hidden", "chain", "seq", "fence"}
        if extra:
            raise RemoteProtocolError(f"step: unknown field(s) {sorted(extra)[:8]}")
        chain = _parse_chain(body["chain"], allow_empty=False) if "chain" in body else ()
        with peer_input():
            return cls(body["position"], EncodedTensor.from_dict(body["hidden"]), chain,
                       body.get("seq", 0), body.get("fence", 0))


@dataclass(frozen=True)
class TrailEntry:
    """One hop's part of a chained step: its output rows as they travel, its signature over the
    step's commitment (``protocols.verification``), its draining flag, and how long it held the
    step (receive to forward, milliseconds: advisory, for the client's speed estimates)."""

    hidden: EncodedTensor
    sig: bytes
    draining: bool = False
    ms: float = 0.0

    def to_body(self) -> dict[str, Any]:
        return {"hidden": self.hidden.to_dict(), "sig": self.sig, "draining": self.draining, "ms": self.ms}

    @classmethod
    def from_body(cls, body: object) -> TrailEntry:
        if not isinstance(body, dict) or set(body) != {"hidden", "sig", "draining", "ms"}:
            raise RemoteProtocolError("trail: each entry needs exactly hidden, sig, draining and ms")
        sig, draining, ms = body["sig"], body["draining"], body["ms"]
        if not isinstance(sig, bytes) or len(sig) != 64:
            raise RemoteProtocolError("trail: sig must be 64 bytes")
        if not isinstance(draining, bool) or type(ms) not in (int, float) or not 0 <= ms < 1e9:
            raise RemoteProtocolError("trail: bad draining flag or ms")
        return cls(EncodedTensor.from_dict(body["hidden"]), sig, draining, float(ms))


def _parse_trail(value: object) -> tuple[TrailEntry, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_CHAIN + 1:
        raise RemoteProtocolError(f"trail must be a list of 1..{MAX_CHAIN + 1} entries")
    trail = tuple(TrailEntry.from_body(e) for e in value)
    rows = trail[0].hidden.shape[0]
    if not 0 < rows <= CHAIN_MAX_ROWS or any(e.hidden.shape[0] != rows for e in trail):
        raise RemoteProtocolError(f"trail: every entry carries the same 1..{CHAIN_MAX_ROWS} rows")
    return trail


_RELAY_FIELDS = frozenset({"session", "relay", "position", "seq", "chain", "trail"})


@dataclass(frozen=True)
class RelayStep:
    """A chained step forwarded server to server on ``RELAY_PROTOCOL``: for the receiver's
    ``session`` (opened by the client, who gave the sender its ``relay`` token), positions
    ``position..``; the input is the previous hop's output, ``trail[-1].hidden``."""

    session: int
    relay: bytes
    position: int
    seq: int
    chain: tuple[ChainHop, ...]  # the hops after the receiver (empty: it is the last)
    trail: tuple[TrailEntry, ...]  # every earlier hop's entry, in route order

    @property
    def hidden(self) -> EncodedTensor:
        return self.trail[-1].hidden

    def to_body(self) -> dict[str, Any]:
        return {"session": self.session, "relay": self.relay, "position": self.position, "seq": self.seq,
                "chain": [h.to_body() for h in self.chain], "trail": [e.to_body() for e in self.trail]}

    @classmethod
    def from_body(cls, body: object) -> RelayStep:
        if not isinstance(body, dict) or set(body) != _RELAY_FIELDS:
            raise RemoteProtocolError("relay_step needs exactly session, relay, position, seq, chain, trail")
        _check_int("relay_step: session", body["session"], 2**63, RemoteProtocolError)
        relay = body["relay"]
        if not isinstance(relay, bytes) or len(relay) != RELAY_TOKEN_LEN:
            raise RemoteProtocolError(f"relay_step: relay must be {RELAY_TOKEN_LEN} bytes")
        _check_int("relay_step: position", body["position"], MAX_LENGTH_LIMIT, RemoteProtocolError)
        if _check_int("relay_step: seq", body["seq"], 2**63, RemoteProtocolError) == 0:
            raise RemoteProtocolError("relay_step: seq must be positive")
        chain = _parse_chain(body["chain"], allow_empty=True)
        trail = _parse_trail(body["trail"])
        if len(chain) + len(trail) > MAX_CHAIN + 1:
            raise RemoteProtocolError(f"relay_step: a chain has at most {MAX_CHAIN + 1} hops")
        return cls(body["session"], relay, body["position"], body["seq"], chain, trail)


def relay_bodies(kind: str, body: dict[str, Any]) -> list[object]:
    """The ``relay_step`` bodies a relay frame carries: itself for ``relay_step``, the entries of
    a ``relay_steps`` (``relay_batch``). Raises RemoteProtocolError for any other kind."""
    if kind == "relay_step":
        return [body]
    if kind == "relay_steps":
        return relay_batch(body)
    raise RemoteProtocolError(f"expected relay_step or relay_steps, got {kind}")


def relay_batch(body: dict[str, Any]) -> list[object]:
    """The entries of a ``relay_steps`` body, each a ``relay_step`` body still to be parsed with
    ``RelayStep.from_body`` (one bad entry spoils only itself). Raises RemoteProtocolError when the
    frame itself is malformed."""
    steps = body.get("steps")
    if set(body) != {"steps"} or not isinstance(steps, list) or not 0 < len(steps) <= RELAY_BATCH_MAX:
        raise RemoteProtocolError(f"relay_steps needs exactly steps, a list of 1..{RELAY_BATCH_MAX} "
                                  "relay_step bodies")
    return steps


@dataclass(frozen=True)
class ChainResult:
    """The last hop's reply to the client, on its own session's stream: every hop's entry."""

    position: int
    seq: int
    trail: tuple[TrailEntry, ...]

    def to_body(self) -> dict[str, Any]:
        return {"position": self.position, "seq": self.seq, "trail": [e.to_body() for e in self.trail]}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ChainResult:
        if set(body) != {"position", "seq", "trail"}:
            raise RemoteProtocolError("chain_result needs exactly position, seq and trail")
        _check_int("chain_result: position", body["position"], MAX_LENGTH_LIMIT, RemoteProtocolError)
        _check_int("chain_result: seq", body["seq"], 2**63, RemoteProtocolError)
        return cls(body["position"], body["seq"], _parse_trail(body["trail"]))


@dataclass(frozen=True)
class StepResult:
    position: int
    hidden: EncodedTensor
    draining: bool = False  # the server asks the client to move this session elsewhere
    # The server's Ed25519 signature over the step's commitment (protocols.verification,
    # docs/PROTOCOL.md 7.2); None only from a server without an identity (never on the wire today).
    sig: bytes | None = None
    # Positions of this step the session had already computed (a chained step the client gave up
    # on had reached this server): the server counts them twice, and so must the client's receipt.
    ahead: int = 0

    def to_body(self) -> dict[str, Any]:
        body = {"position": self.position, "hidden": self.hidden.to_dict(), "draining": self.draining}
        if self.sig is not None:
            body["sig"] = self.sig
        if self.ahead:
            body["ahead"] = self.ahead
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> StepResult:
        """Raises RemoteProtocolError (RemoteTensorError for the tensor); an absent ``sig`` is None
        here, and the client decides whether that is a fault."""
        position, draining, sig = body.get("position"), body.get("draining", False), body.get("sig")
        if type(position) is not int or not isinstance(draining, bool):
            raise RemoteProtocolError("step_result: bad position or draining flag")
        if sig is not None and not (isinstance(sig, bytes) and len(sig) == 64):
            raise RemoteProtocolError("step_result: sig must be 64 bytes")
        ahead = _check_int("step_result: ahead", body.get("ahead", 0), MAX_LENGTH_LIMIT,
                           RemoteProtocolError)
        return cls(position, EncodedTensor.from_dict(body.get("hidden")), draining, sig, ahead)


# --- the client's side of a session ------------------------------------------------------------------
# Kept apart from the server's half above (h11 has a state machine for both halves of a connection).


class ClientState(enum.Enum):
    """The client's side of one session (the transition table is ``CLIENT_TRANSITIONS``)."""

    IDLE = "idle"  # a stream, no session: session_open may go (again, after a refusal)
    OPENING = "opening"  # session_open sent: session_opened or error awaited
    OPEN = "open"  # steps may go
    STEPPING = "stepping"  # a plain step sent: its step_result awaited
    CHAINED = "chained"  # the session takes part in a chained step (6.5) not yet settled
    DRAINING = "draining"  # the server asked us to move the session; it still answers
    FAILED = "failed"  # no more steps: given up (deadline, bad reply, caught) or ended by the server
    RECEIPT = "receipt"  # receipt_proposal sent: receipt or error awaited
    SETTLED = "settled"  # the receipt exchange is over: only session_close may go
    CLOSING = "closing"  # session_close sent: session_closed awaited
    CLOSED = "closed"  # the stream is gone


# What the client sends, or decides on its own (its moves: an illegal one is a LocalProtocolError).
CLIENT_MOVES = frozenset({"session_open", "step", "chained_step", "receipt_proposal", "session_close",
                          "fail", "chain_done", "chain_broken", "keep", "reset"})
# What the server sends (an unexpected one is a RemoteProtocolError). ``draining`` is the flag of
# the step_result (or of the session's own chain_result entry) just received.
CLIENT_RECEIVES = frozenset({"session_opened", "error", "step_result", "draining", "chain_result",
                             "chain_failed", "receipt", "session_closed"})

_C = ClientState
CLIENT_TRANSITIONS: dict[tuple[ClientState, str], ClientState] = {
    (_C.IDLE, "session_open"): _C.OPENING,
    (_C.OPENING, "session_opened"): _C.OPEN,
    (_C.OPENING, "error"): _C.IDLE,
    (_C.OPENING, "fail"): _C.FAILED,
    (_C.OPEN, "step"): _C.STEPPING,
    (_C.OPEN, "chained_step"): _C.CHAINED,
    (_C.OPEN, "draining"): _C.DRAINING,
    (_C.OPEN, "fail"): _C.FAILED,
    (_C.STEPPING, "step_result"): _C.OPEN,
    (_C.STEPPING, "chain_result"): _C.STEPPING,
    (_C.STEPPING, "chain_failed"): _C.STEPPING,
    (_C.STEPPING, "error"): _C.FAILED,
    (_C.STEPPING, "fail"): _C.FAILED,
    (_C.CHAINED, "chain_result"): _C.CHAINED,
    (_C.CHAINED, "chain_failed"): _C.CHAINED,
    (_C.CHAINED, "error"): _C.FAILED,
    (_C.CHAINED, "fail"): _C.FAILED,
    (_C.CHAINED, "chain_done"): _C.OPEN,
    (_C.CHAINED, "chain_broken"): _C.OPEN,
    (_C.DRAINING, "step"): _C.STEPPING,
    (_C.DRAINING, "keep"): _C.OPEN,
    (_C.DRAINING, "fail"): _C.FAILED,
    (_C.RECEIPT, "receipt"): _C.SETTLED,
    (_C.RECEIPT, "error"): _C.SETTLED,
    (_C.RECEIPT, "step_result"): _C.RECEIPT,
    (_C.RECEIPT, "chain_result"): _C.RECEIPT,
    (_C.RECEIPT, "chain_failed"): _C.RECEIPT,
    (_C.RECEIPT, "session_close"): _C.CLOSING,
    (_C.SETTLED, "session_close"): _C.CLOSING,
    **{(state, "receipt_proposal"): _C.RECEIPT for state in (_C.OPEN, _C.DRAINING, _C.FAILED)},
    **{(state, "session_close"): _C.CLOSING for state in (_C.OPEN, _C.DRAINING, _C.FAILED)},
    # Whatever comes after our session_close ends the session: a late reply to a request we gave
    # up on (a step, a receipt) may come before session_closed, and the stream goes either way.
    **{(_C.CLOSING, kind): _C.CLOSED for kind in ("session_closed", "error", "step_result", "chain_result",
                                                    "chain_failed", "receipt")},
    **{(state, "reset"): _C.CLOSED for state in ClientState if state is not _C.CLOSED},
}
del _C


class ClientSession:
    """The client's side of one session, sans-IO: ``send`` our moves, ``receive`` the server's kinds.

    Transitions (``CLIENT_TRANSITIONS``; our move out of turn is a ``LocalProtocolError``, the
    server's message out of turn a ``RemoteProtocolError``, each naming the state and event)::

        state      event             by      -> state     why
        IDLE       session_open      client  OPENING
        OPENING    session_opened    server  OPEN
        OPENING    error             server  IDLE         refused: not opened (busy, draining, ...)
        OPENING    fail              client  FAILED       no reply in time, a bad session_opened
        OPEN       step              client  STEPPING
        OPEN       chained_step      client  CHAINED      this session is one hop of a chained step
        OPEN       draining          server  DRAINING     the reply just received says so
        OPEN       fail              client  FAILED       a bad reply (found once received), caught
        STEPPING   step_result       server  OPEN
        STEPPING   chain_result,     server  STEPPING     unasked: of a chained step given up (skipped)
                   chain_failed
        STEPPING   error             server  FAILED
        STEPPING   fail              client  FAILED       deadline passed, or the caller was cancelled
        CHAINED    chain_result,     server  CHAINED      checked, then chain_done or chain_broken
                   chain_failed                           (another seq's is stale: skipped)
        CHAINED    error             server  FAILED       the session ended (owner stop, idle)
        CHAINED    fail              client  FAILED       the caller was cancelled mid-chain
        CHAINED    chain_done        client  OPEN         every hop's entry checked out
        CHAINED    chain_broken      client  OPEN         no blame: redone hop by hop (``ahead``)
        DRAINING   step              client  STEPPING     it still answers (a verifier's session)
        DRAINING   keep              client  OPEN         nowhere to move it: keep using it
        DRAINING   fail              client  FAILED
        OPEN, DRAINING, FAILED  receipt_proposal  client  RECEIPT
        OPEN, DRAINING, FAILED  session_close     client  CLOSING   no receipt wanted
        RECEIPT    receipt, error    server  SETTLED      countersigned, or refused ("closing")
        RECEIPT    step_result,      server  RECEIPT      the late reply of a step given up
                   chain_result, chain_failed
        RECEIPT    session_close     client  CLOSING      no reply in time: closed anyway
        SETTLED    session_close     client  CLOSING
        CLOSING    session_closed    server  CLOSED       (or any late reply: the stream goes)
        any but CLOSED  reset        client  CLOSED       the stream is reset or closed

    Not cancellable (no I/O); the caller feeds it the kind of each envelope before acting on it.
    """

    def __init__(self) -> None:
        self.state = ClientState.IDLE

    def send(self, event: str) -> ClientState:
        """Our move ``event`` (``CLIENT_MOVES``); raises LocalProtocolError if it is not allowed now."""
        nxt = CLIENT_TRANSITIONS.get((self.state, event)) if event in CLIENT_MOVES else None
        if nxt is None:
            raise LocalProtocolError(f"client may not {event!r} in session state {self.state.value}")
        self.state = nxt
        return nxt

    def receive(self, kind: str) -> ClientState:
        """The server sent ``kind`` (``CLIENT_RECEIVES``); raises RemoteProtocolError if unexpected."""
        nxt = CLIENT_TRANSITIONS.get((self.state, kind)) if kind in CLIENT_RECEIVES else None
        if nxt is None:
            raise RemoteProtocolError(f"unexpected {kind!r} from the server in client session state "
                                      f"{self.state.value}")
        self.state = nxt
        return nxt
