"""The misbehaviour report topic: name, wire form, limits, the receiver's decision and what it
remembers about accused peers. Pure (docs/PROTOCOL.md section 7.5).

A client that caught a server returning wrong rows gossips the evidence fleet-wide on
``/idlefleet/v1/misbehaviour``: one envelope of kind ``misbehaviour``,
``{"report": bin, "published_at": float64, "sig": bin(64)}``, where ``report`` is a signed
misbehaviour report (:func:`idlefleet.protocols.receipts.verify_report`, section 7.4) and ``sig`` is
the publisher's Ed25519 signature over ``GOSSIP_DOMAIN || sha256(report) || published_at`` (IEEE
754 binary64, big-endian). The report itself carries no time; the signed ``published_at`` bounds
how long a copy travels, so a valid report cannot be replayed forever. Only the reporter publishes
its own report (the GossipSub ``from`` must be the report's ``reporter``).

``check_report_gossip`` is the validator's decision; :class:`Accusations` is the receiver's memory
of who was accused by whom, which routing reads (``is_accused``) to lower those peers' rank.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from idlefleet.protocols import wire
from idlefleet.protocols.errors import RecordRejected, RemoteProtocolError
from idlefleet.protocols.peerid import public_key_from_peer_id
from idlefleet.protocols.receipts import MAX_REPORT_SIZE, MisbehaviourReport, verify_report

__all__ = [
    "GOSSIP_DOMAIN",
    "MAX_AGE_S",
    "MAX_SKEW_S",
    "REPORT_KIND",
    "REPORT_TOPIC",
    "Accusations",
    "ReportGossip",
    "check_report_gossip",
    "encode_report_gossip",
    "report_digest",
    "report_still_current",
]

REPORT_TOPIC = "/idlefleet/v1/misbehaviour"  # fleet-wide: a cheat may serve any region
REPORT_KIND = "misbehaviour"
GOSSIP_DOMAIN = b"idlefleet/misbehaviour-gossip/v1\x00"
#: The report (at most 64 KiB) plus the envelope, the keys, ``published_at`` and the signature.
wire.register_kind(REPORT_KIND, MAX_REPORT_SIZE + 256)

MAX_AGE_S = 600.0  # a copy is accepted for 10 minutes after ``published_at`` ...
MAX_SKEW_S = 30.0  # ... and up to 30 s before it (clock skew)
RESEND_MARGIN_S = 60.0  # re-sent only while at least this much of the window remains


def report_digest(report: bytes) -> bytes:
    """SHA-256 of the report bytes: what receivers deduplicate on (whoever wraps it, whenever)."""
    return hashlib.sha256(report).digest()


def _signed_bytes(report: bytes, published_at: float) -> bytes:
    return GOSSIP_DOMAIN + report_digest(report) + struct.pack(">d", published_at)


def encode_report_gossip(report: bytes, key: Ed25519PrivateKey, now: float) -> bytes:
    """The ``misbehaviour`` envelope publishing ``report`` (signed by its reporter) at ``now``."""
    return wire.encode_envelope(REPORT_KIND, {"report": report, "published_at": float(now),
                                              "sig": key.sign(_signed_bytes(report, float(now)))})


@dataclass(frozen=True)
class ReportGossip:
    report: MisbehaviourReport
    accused: str
    digest: bytes
    published_at: float


def _unwrap(data: bytes) -> tuple[bytes, float, bytes]:
    try:
        env = wire.decode_envelope(data)
    except RemoteProtocolError as e:
        raise RecordRejected("malformed", str(e)) from None
    if env.kind != REPORT_KIND:
        raise RecordRejected("malformed", f"unexpected kind {env.kind!r} on the misbehaviour topic")
    body = env.body
    report, at, sig = body.get("report"), body.get("published_at"), body.get("sig")
    if (body.keys() != {"report", "published_at", "sig"} or not isinstance(report, bytes)
            or not isinstance(at, float) or not math.isfinite(at)
            or not isinstance(sig, bytes) or len(sig) != 64):
        raise RecordRejected("malformed", 'misbehaviour message must be {"report": bin, '
                                          '"published_at": float64, "sig": bin(64)}')
    return report, at, sig


def check_report_gossip(data: bytes, origin: str, now: float, *,
                        seen: Callable[[bytes], bool],
                        budget: Callable[[str], bool]) -> ReportGossip | None:
    """Decide about one message from ``origin`` (the GossipSub ``from``). Returns the verified
    report, or None for a report already seen (``seen(digest)``; dropped silently, not forwarded).

    Cheap checks first, the full evidence check last: size and shape (``malformed``), freshness
    (``stale_report``), duplicate, the publisher's signature under ``origin``'s key
    (``bad_signature``), ``origin``'s report budget (``budget(origin)`` spends one; ``rate_limited``),
    then :func:`verify_report` (``bad_report``) and ``reporter == origin`` (``source_mismatch``).
    Raises ``RecordRejected`` with that reason.
    """
    report, at, sig = _unwrap(data)
    if not now - MAX_AGE_S <= at <= now + MAX_SKEW_S:
        raise RecordRejected("stale_report", f"published_at {at:.0f} is outside [now - {MAX_AGE_S:.0f} s, "
                                             f"now + {MAX_SKEW_S:.0f} s]")
    digest = report_digest(report)
    if seen(digest):
        return None
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(origin))
        key.verify(sig, _signed_bytes(report, at))
    except (InvalidSignature, RemoteProtocolError, ValueError):
        raise RecordRejected("bad_signature", f"misbehaviour message not signed by {origin[-8:]}") from None
    if not budget(origin):
        raise RecordRejected("rate_limited", f"{origin[-8:]} is over its report budget")
    try:
        parsed, accused = verify_report(report)
    except RemoteProtocolError as e:
        raise RecordRejected("bad_report", str(e)) from None
    if parsed.reporter != origin:
        raise RecordRejected("source_mismatch", f"{origin[-8:]} published a report by {parsed.reporter[-8:]}")
    return ReportGossip(parsed, accused, digest, at)


def report_still_current(data: bytes, now: float) -> bool:
    """Would a receiver still accept this message's freshness now (with ``RESEND_MARGIN_S`` to
    travel)? GossipSub re-sends only such messages. Never raises."""
    try:
        _, at, _ = _unwrap(data)
    except RecordRejected:
        return False
    return at + MAX_AGE_S - RESEND_MARGIN_S > now


class Accusations:
    """Who was accused, by how many distinct reporters, until when. Bounded.

    A peer accused by one reporter stays accused for ``base_s`` after the report; each further
    distinct reporter (within ``memory_s``) doubles that, up to ``max_s``: ``until = latest report
    + base_s * 2 ** (reporters - 1)``. The same reporter accusing the same peer again only moves
    ``latest``. At most ``max_accused`` peers (the one whose accusation ends first is forgotten
    first) and ``max_reporters`` reporters per peer are remembered.
    """

    def __init__(self, *, base_s: float = 600.0, max_s: float = 86400.0, memory_s: float = 86400.0,
                 max_accused: int = 1024, max_reporters: int = 32) -> None:
        self.base_s, self.max_s, self.memory_s = base_s, max_s, memory_s
        self.max_accused, self.max_reporters = max_accused, max_reporters
        self._by: dict[str, OrderedDict[str, float]] = {}  # accused -> reporter -> when

    def accuse(self, accused: str, reporter: str, now: float) -> int:
        """Record ``reporter``'s accusation of ``accused`` at ``now``; returns the number of distinct
        reporters now accusing it."""
        self.prune(now)
        reporters = self._by.setdefault(accused, OrderedDict())
        reporters.pop(reporter, None)
        reporters[reporter] = now  # most recent last
        while len(reporters) > self.max_reporters:
            reporters.popitem(last=False)
        while len(self._by) > self.max_accused:
            first = min(self._by, key=lambda peer: self._until(self._by[peer]))
            del self._by[first]
        return len(reporters)

    def _until(self, reporters: OrderedDict[str, float]) -> float:
        latest = max(reporters.values())
        return latest + min(self.max_s, self.base_s * 2.0 ** (len(reporters) - 1))

    def until(self, peer: str, now: float) -> float | None:
        """When ``peer``'s accusation ends, or None if it is not accused now."""
        reporters = self._by.get(peer)
        if not reporters:
            return None
        live = {r: t for r, t in reporters.items() if now - t < self.memory_s}
        if not live:
            return None
        end = self._until(OrderedDict(live))
        return end if end > now else None

    def is_accused(self, peer: str, now: float) -> bool:
        return self.until(peer, now) is not None

    def reporters(self, peer: str, now: float) -> int:
        """Distinct reporters of ``peer`` remembered (within ``memory_s``)."""
        return sum(1 for t in self._by.get(peer, {}).values() if now - t < self.memory_s)

    def accused(self, now: float) -> dict[str, float]:
        """Every peer accused now -> when its accusation ends."""
        return {peer: end for peer in self._by if (end := self.until(peer, now)) is not None}

    def prune(self, now: float) -> None:
        """Forget reporters older than ``memory_s`` and peers nobody accuses any more."""
        for peer in list(self._by):
            reporters = self._by[peer]
            for reporter in [r for r, t in reporters.items() if now - t >= self.memory_s]:
                del reporters[reporter]
            if not reporters:
                del self._by[peer]

    def __len__(self) -> int:
        return len(self._by)
