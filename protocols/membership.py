"""Membership decisions: peer-down notices are hints, dials are budgeted. Pure state, fed events.

A signed peer-down notice proves only who sent it, not that its subject is dead: any peer can sign
one about any other. So (SWIM) a receiver never evicts on a notice alone. ``NoticeGate.on_notice``
decides what a notice is worth:

=================  =========================================================================
verdict            when
=================  =========================================================================
``rate_limited``   the reporter spent its budget (``notice_burst``, one more per
                   ``notice_refill_s``): dropped, not forwarded
``refute``         the notice is about us: publish a fresh record (the publisher keeps its
                   minimum interval, so a flood of notices cannot make us flood the topic)
``unknown``        we hold no record of the subject: nothing to evict
``stale``          ``subject_seq`` is below the subject's latest record we hold: already refuted
``checking``       a check of this subject is running: the notice joins it
``busy``           ``max_checks`` checks are running: the notice is forwarded, not checked here
``check``          probe the subject (directly, and indirectly through other peers), then call
                   ``on_check_done``; only a failed check evicts, and it covers at most the
                   latest record we had seen (``covered_seq``), never the reporter's number
=================  =========================================================================

Because ``covered_seq`` is bounded by what this node has seen, any record the subject signs later
has a higher ``seq`` and refutes the eviction: a victim can always come back.

``DialBudget`` decides which record addresses may be dialled: one dial per peer at a time, a
back-off after failures, each address at most once per back-off period whoever claims it, at most
``max_addrs`` addresses per dial and ``dial_burst`` dials per ``dial_refill_s`` overall.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from idlefleet.protocols import wire
from idlefleet.protocols.errors import LocalProtocolError, RemoteProtocolError
from idlefleet.protocols.messages import MAX_NONCE
from idlefleet.protocols.peerid import MAX_PEER_ID_LEN

# --- indirect probes (SWIM ping-req) ---------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRequest:
    """"Heartbeat ``target`` for me and tell me if it answered" (SWIM's ping-req)."""

    KIND: ClassVar[str] = "probe_request"
    nonce: int
    target: str

    def __post_init__(self) -> None:
        if type(self.nonce) is not int or not 0 <= self.nonce <= MAX_NONCE:
            raise LocalProtocolError(f"probe_request: nonce must be an int in 0..{MAX_NONCE}")
        if not (isinstance(self.target, str) and 0 < len(self.target) <= MAX_PEER_ID_LEN
                and all("!" <= c <= "~" for c in self.target)):
            raise LocalProtocolError(f"probe_request: target must be 1..{MAX_PEER_ID_LEN} printable chars")

    def to_body(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "target": self.target}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ProbeRequest:
        """Raises ``RemoteProtocolError`` for a malformed body."""
        if body.keys() != {"nonce", "target"}:
            raise RemoteProtocolError(f"probe_request body keys {sorted(body)}, expected nonce, target")
        try:
            return cls(body["nonce"], body["target"])
        except LocalProtocolError as e:
            raise RemoteProtocolError(str(e)) from None


@dataclass(frozen=True)
class ProbeResult:
    """The answer to a ``probe_request``: did ``target`` answer a heartbeat in time."""

    KIND: ClassVar[str] = "probe_result"
    nonce: int
    alive: bool

    def __post_init__(self) -> None:
        if type(self.nonce) is not int or not 0 <= self.nonce <= MAX_NONCE:
            raise LocalProtocolError(f"probe_result: nonce must be an int in 0..{MAX_NONCE}")
        if type(self.alive) is not bool:
            raise LocalProtocolError("probe_result: alive must be a bool")

    def to_body(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "alive": self.alive}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ProbeResult:
        """Raises ``RemoteProtocolError`` for a malformed body."""
        if body.keys() != {"nonce", "alive"}:
            raise RemoteProtocolError(f"probe_result body keys {sorted(body)}, expected alive, nonce")
        try:
            return cls(body["nonce"], body["alive"])
        except LocalProtocolError as e:
            raise RemoteProtocolError(str(e)) from None


wire.register_kind(ProbeRequest.KIND, 512)
wire.register_kind(ProbeResult.KIND, 256)


# --- notices --------------------------------------------------------------------------------------

Verdict = Literal["rate_limited", "refute", "unknown", "stale", "checking", "busy", "check"]
FORWARD: frozenset[Verdict] = frozenset({"refute", "unknown", "stale", "checking", "busy", "check"})
"""Verdicts under which a notice is valid gossip and is forwarded to the mesh."""


@dataclass(frozen=True)
class MembershipConfig:
    notice_burst: int = 5  # notices a reporter may send at once ...
    notice_refill_s: float = 10.0  # ... and then one more per this many seconds
    max_reporters: int = 1024  # bound on the rate limiter's memory
    max_checks: int = 8  # concurrent subject checks
    recheck_s: float = 5.0  # a subject found alive is not checked again for this long


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """One token bucket per key, with bounded memory: full buckets are forgotten first."""

    def __init__(self, burst: int, refill_s: float, max_keys: int) -> None:
        self._burst, self._refill_s, self._max_keys = burst, refill_s, max_keys
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, now: float) -> bool:
        """Spend one token of ``key``'s bucket. False if it has none (or no memory is left)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._forget_full(now)
                if len(self._buckets) >= self._max_keys:
                    return False
            bucket = self._buckets[key] = _Bucket(float(self._burst), now)
        bucket.tokens = min(float(self._burst), bucket.tokens + max(0.0, now - bucket.at) / self._refill_s)
        bucket.at = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _forget_full(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items()
                    if b.tokens + (now - b.at) / self._refill_s >= self._burst]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class NoticeGate:
    """What to do with peer-down notices; owned by one node task (not thread-safe)."""

    def __init__(self, me: str, config: MembershipConfig = MembershipConfig()) -> None:
        self.me = me
        self.config = config
        self._reporters = TokenBuckets(config.notice_burst, config.notice_refill_s, config.max_reporters)
        self._checking: dict[str, int] = {}  # subject -> covered seq of the running check
        self._alive_at: dict[str, float] = {}  # subject -> when a check last found it alive

    def on_notice(self, reporter: str, subject: str, subject_seq: int, now: float, *,
                  last_seen_seq: int | None) -> tuple[Verdict, int]:
        """Decide about a verified notice. Returns ``(verdict, covered_seq)``; ``covered_seq`` is
        only meaningful for ``check``: the highest record seq a failed check may evict."""
        if not self._reporters.take(reporter, now):
            return "rate_limited", -1
        if subject == self.me:
            return "refute", -1
        if last_seen_seq is None:
            return "unknown", -1
        if subject_seq < last_seen_seq:
            return "stale", -1
        covered = last_seen_seq  # never the reporter's number: a later record always refutes
        if subject in self._checking:
            self._checking[subject] = max(self._checking[subject], covered)
            return "checking", covered
        alive_at = self._alive_at.get(subject)
        if alive_at is not None and now - alive_at < self.config.recheck_s:
            return "stale", -1
        if len(self._checking) >= self.config.max_checks:
            return "busy", -1
        self._checking[subject] = covered
        return "check", covered

    def on_check_done(self, subject: str, alive: bool, now: float) -> int | None:
        """A check finished. Returns the seq to mark down up to if the subject is dead, else None."""
        covered = self._checking.pop(subject, None)
        if alive:
            self._alive_at[subject] = now
            return None
        self._alive_at.pop(subject, None)
        return covered

    def checking(self) -> frozenset[str]:
        return frozenset(self._checking)

    def prune(self, now: float) -> None:
        for subject in [s for s, t in self._alive_at.items() if now - t >= self.config.recheck_s]:
            del self._alive_at[subject]


@dataclass(frozen=True)
class DialConfig:
    dial_burst: int = 8
    dial_refill_s: float = 2.0  # one more dial per this many seconds after the burst
    backoff_s: float = 30.0  # after a failed dial; doubles per consecutive failure ...
    max_backoff_s: float = 300.0  # ... up to this
    max_addrs: int = 4
    max_tracked: int = 4096


@dataclass
class _PeerDials:
    failures: int = 0
    retry_at: float = 0.0
    in_flight: bool = False


@dataclass
class DialBudget:
    """Which addresses of a record may be dialled now. Call ``plan``, then ``done`` after the dial."""

    config: DialConfig = DialConfig()
    _peers: dict[str, _PeerDials] = field(default_factory=dict)
    _addr_at: dict[str, float] = field(default_factory=dict)  # address -> when last dialled
    _tokens: float = -1.0
    _tokens_at: float = 0.0

    def plan(self, peer_id: str, addrs: list[str] | tuple[str, ...], now: float) -> list[str]:
        """Addresses to dial for ``peer_id`` now (deduplicated, at most ``max_addrs``), or [] if
        this dial is not allowed. A non-empty plan must be followed by ``done``."""
        c = self.config
        state = self._peers.get(peer_id)
        if state is not None and (state.in_flight or now < state.retry_at):
            return []
        picked: list[str] = []
        for addr in dict.fromkeys(addrs):
            last = self._addr_at.get(addr)
            if last is None or now - last >= c.backoff_s:
                picked.append(addr)
            if len(picked) == c.max_addrs:
                break
        if not picked:
            return []
        if self._tokens < 0:
            self._tokens, self._tokens_at = float(c.dial_burst), now
        self._tokens = min(float(c.dial_burst), self._tokens + (now - self._tokens_at) / c.dial_refill_s)
        self._tokens_at = now
        if self._tokens < 1.0:
            return []
        if len(self._peers) >= c.max_tracked or len(self._addr_at) >= c.max_tracked:
            self._prune(now)
            if len(self._peers) >= c.max_tracked or len(self._addr_at) >= c.max_tracked:
                return []
        self._tokens -= 1.0
        for addr in picked:
            self._addr_at[addr] = now
        state = self._peers.setdefault(peer_id, _PeerDials())
        state.in_flight = True
        return picked

    def done(self, peer_id: str, ok: bool, now: float, addrs: list[str] | tuple[str, ...] = ()) -> None:
        """Report a planned dial's outcome. Addresses of a successful dial may be dialled again."""
        state = self._peers.setdefault(peer_id, _PeerDials())
        state.in_flight = False
        if ok:
            state.failures, state.retry_at = 0, now
            for addr in addrs:
                self._addr_at.pop(addr, None)
        else:
            state.failures += 1
            state.retry_at = now + min(self.config.max_backoff_s,
                                       self.config.backoff_s * 2 ** (state.failures - 1))

    def _prune(self, now: float) -> None:
        c = self.config
        for p in [p for p, s in self._peers.items() if not s.in_flight and s.retry_at <= now]:
            del self._peers[p]
        for a in [a for a, t in self._addr_at.items() if now - t >= c.backoff_s]:
            del self._addr_at[a]
