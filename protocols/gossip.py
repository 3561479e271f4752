"""The capacity topic: its name, its message kinds and what a receiver accepts from it. Pure.

Every GossipSub message on ``/idlefleet/v1/capacity/<region>`` is one envelope of kind ``capacity``
(``{"record": bin}``) or ``peer_down`` (``{"notice": bin}``). ``check_gossip`` is the validator's
decision, a pure function of the bytes, the sender (GossipSub ``from``), this node's id, ``now`` and
what the view already holds; the node applies the result (docs/PROTOCOL.md section 4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from idlefleet.protocols import wire
from idlefleet.protocols.errors import RecordRejected, RemoteProtocolError
from idlefleet.protocols.notices import PeerDownNotice, decode_notice
from idlefleet.protocols.records import CapacityRecord, validate_record

CAPACITY_KIND = "capacity"
PEER_DOWN_KIND = "peer_down"
wire.register_kind(CAPACITY_KIND, 8 * 1024)
wire.register_kind(PEER_DOWN_KIND, 4 * 1024)


def capacity_topic(region: str) -> str:
    """GossipSub topic carrying capacity records and peer-down notices of one region."""
    return f"/idlefleet/v1/capacity/{region}"


@dataclass(frozen=True)
class RecordGossip:
    record: CapacityRecord
    raw: bytes


@dataclass(frozen=True)
class NoticeGossip:
    notice: PeerDownNotice


def claimed_peer(raw: bytes) -> str | None:
    """The peer id a record claims (unverified), only to look up its sequence floor."""
    try:
        outer = wire.unpack(raw, what="record")
        body = wire.unpack(outer["body"], what="record body")
        pid = body.get("peer_id")
        return pid if isinstance(pid, str) else None
    except Exception:  # garbage of any shape: validate_record names the real reason
        return None


def check_gossip(data: bytes, origin: str, me: str, now: float, *,
                 last_seq: Callable[[str], int | None],
                 held: Callable[[str], bytes | None]) -> RecordGossip | NoticeGossip | None:
    """Decide about one message from ``origin``. Returns what it carries, or None for a duplicate
    of the record already held (dropped silently: GossipSub replays its cache to new peers).

    ``last_seq(peer)`` is the highest sequence seen from ``peer``; ``held(peer)`` the signed bytes
    of the record held for it. Raises ``RecordRejected`` with the reason (``malformed``,
    ``source_mismatch``, ``bad_notice`` or a record validation reason).
    """
    try:
        env = wire.decode_envelope(data)
    except RemoteProtocolError as e:
        raise RecordRejected("malformed", str(e)) from None
    if env.kind == CAPACITY_KIND:
        raw = env.body.get("record")
        if not isinstance(raw, bytes) or env.body.keys() != {"record"}:
            raise RecordRejected("malformed", "capacity message must be {\"record\": bin}")
        pid = claimed_peer(raw)
        if pid is not None and held(pid) == raw:
            return None
        record = validate_record(raw, now, last_seq=last_seq(pid) if pid else None)
        if record.peer_id != origin:
            raise RecordRejected("source_mismatch",
                                 f"{origin[-8:]} published a record of {record.peer_id[-8:]}")
        if record.peer_id == me:
            raise RecordRejected("source_mismatch", "a record claiming to be us")
        return RecordGossip(record, raw)
    if env.kind == PEER_DOWN_KIND:
        raw = env.body.get("notice")
        if not isinstance(raw, bytes) or env.body.keys() != {"notice"}:
            raise RecordRejected("malformed", "peer_down message must be {\"notice\": bin}")
        try:
            notice = decode_notice(raw, now)
        except RemoteProtocolError as e:
            raise RecordRejected("bad_notice", str(e)) from None
        if notice.reporter != origin:
            raise RecordRejected("source_mismatch", "notice relayed under another identity")
        return NoticeGossip(notice)
    raise RecordRejected("malformed", f"unexpected kind {env.kind!r} on the capacity topic")


#: A notice is accepted for 60 s after ``observed_at``; it is re-sent only while this much of that
#: window remains for it to travel.
NOTICE_RESEND_MARGIN_S = 10.0


def still_current(data: bytes, now: float, *,
                  held: Callable[[str], tuple[bytes, float] | None]) -> bool:
    """Would a receiver still accept this message of ours now (docs/PROTOCOL.md section 4,
    "Re-sending")? GossipSub re-sends its cache and the queue it kept for identifying peers; a
    record superseded by a newer one (``held(peer)`` gives the signed bytes and ``expires_at`` of
    the record held), an expired record, or a notice near the end of its freshness window would
    only be rejected there. Never raises: anything undecodable is not re-sent."""
    try:
        env = wire.decode_envelope(data)
    except RemoteProtocolError:
        return False
    if env.kind == CAPACITY_KIND:
        raw = env.body.get("record")
        pid = claimed_peer(raw) if isinstance(raw, bytes) else None
        latest = held(pid) if pid else None
        return latest is not None and latest[0] == raw and now < latest[1]
    if env.kind == PEER_DOWN_KIND:
        raw = env.body.get("notice")
        if not isinstance(raw, bytes):
            return False
        try:
            decode_notice(raw, now + NOTICE_RESEND_MARGIN_S)
        except RemoteProtocolError:
            return False
        return True
    return False
