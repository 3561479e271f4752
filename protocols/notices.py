"""Signed peer-down notices: how a fleet learns within seconds that a car went away.

A node whose heartbeats to a connected peer fail evicts it and publishes a notice signed with its
own key: "I, *reporter*, saw *subject* (whose latest record I had was *subject_seq*) go dead at
*observed_at*". A notice is a hint, not a verdict (``protocols.membership.NoticeGate``): receivers
check the subject themselves before evicting it, and never evict records newer than the latest one
they had seen. A subject that is in fact alive refutes the notice by publishing a fresh record
(higher sequence), as in SWIM. ``reason`` is 0..200 characters of printable ASCII including space
(0x20..0x7e); ``notice_reason`` makes any text fit. Wire form: msgpack ``{"body": bin, "sig":
bin(64)}``, signature = Ed25519 over ``NOTICE_DOMAIN + body`` by the reporter's key (derived from
the reporter peer id).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from idlefleet.protocols.errors import LocalProtocolError, RemoteProtocolError, peer_input
from idlefleet.protocols.peerid import public_key_from_peer_id

NOTICE_DOMAIN = b"idlefleet/peer-down/v1\x00"
NOTICE_VERSION = 1
MAX_NOTICE_SIZE = 1024
MAX_REASON_LEN = 200


def notice_reason(text: str) -> str:
    """``text`` made a valid notice reason: other characters become ``?``, cut to 200."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:MAX_REASON_LEN]


@dataclass(frozen=True)
class PeerDownNotice:
    """One notice (unsigned form). Construction checks the fields (LocalProtocolError);
    :func:`decode_notice`, reading a peer's, raises RemoteProtocolError."""

    reporter: str
    subject: str
    subject_seq: int
    observed_at: float
    reason: str = ""

    def __post_init__(self) -> None:
        if self.reporter == self.subject:
            raise LocalProtocolError("peer-down notice: a peer cannot report itself")
        if type(self.subject_seq) is not int or not 0 <= self.subject_seq < 2**63:
            raise LocalProtocolError("peer-down notice: subject_seq out of range")
        if not isinstance(self.observed_at, float) or not math.isfinite(self.observed_at):
            raise LocalProtocolError("peer-down notice: observed_at must be a finite float")
        if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON_LEN:
            raise LocalProtocolError("peer-down notice: reason too long")
        if not all(" " <= c <= "~" for c in self.reason):
            raise LocalProtocolError("peer-down notice: reason must be printable ASCII")


def encode_notice(notice: PeerDownNotice, key: Ed25519PrivateKey) -> bytes:
    body = msgpack.packb({
        "v": NOTICE_VERSION,
        "reporter": notice.reporter,
        "subject": notice.subject,
        "subject_seq": notice.subject_seq,
        "observed_at": notice.observed_at,
        "reason": notice.reason,
    }, use_bin_type=True)
    return bytes(msgpack.packb({"body": body, "sig": key.sign(NOTICE_DOMAIN + body)}, use_bin_type=True))


def _unpack_map(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_NOTICE_SIZE,
                              max_str_len=MAX_NOTICE_SIZE, max_array_len=16, max_map_len=16)
    except Exception as e:  # msgpack raises many types on garbage; all mean the same to us
        raise RemoteProtocolError(f"{what} is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what} is not a map")
    return obj


def decode_notice(data: bytes, now: float, *, max_age: float = 60.0,
                  max_skew: float = 30.0) -> PeerDownNotice:
    """Verify and decode a notice. Pure. Raises RemoteProtocolError with the reason."""
    if len(data) > MAX_NOTICE_SIZE:
        raise RemoteProtocolError(f"peer-down notice oversized: {len(data)} > {MAX_NOTICE_SIZE} bytes")
    outer = _unpack_map(data, "peer-down notice")
    body, sig = outer.get("body"), outer.get("sig")
    if not isinstance(body, bytes) or not isinstance(sig, bytes) or len(sig) != 64:
        raise RemoteProtocolError("peer-down notice: needs bin body and 64-byte sig")
    fields = _unpack_map(body, "peer-down notice body")
    if fields.get("v") != NOTICE_VERSION:
        raise RemoteProtocolError(f"peer-down notice: unknown version {fields.get('v')!r}")
    reporter = fields.get("reporter")
    if not isinstance(reporter, str):
        raise RemoteProtocolError("peer-down notice: reporter missing")
    try:
        reporter_key = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(reporter))
        reporter_key.verify(sig, NOTICE_DOMAIN + body)
    except InvalidSignature:
        raise RemoteProtocolError("peer-down notice: bad signature") from None
    subject = fields.get("subject")
    if not isinstance(subject, str):
        raise RemoteProtocolError("peer-down notice: subject missing")
    public_key_from_peer_id(subject)  # must be a well-formed peer id
    with peer_input():
        notice = PeerDownNotice(reporter, subject, fields.get("subject_seq"),  # type: ignore[arg-type]
                                fields.get("observed_at"), fields.get("reason", ""))  # type: ignore[arg-type]
    if notice.observed_at > now + max_skew:
        raise RemoteProtocolError("peer-down notice: observed in the future")
    if notice.observed_at < now - max_age:
        raise RemoteProtocolError("peer-down notice: too old")
    return notice
