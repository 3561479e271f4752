"""check_gossip: the capacity topic validator's decision, pure and table-driven."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.protocols import wire
from idlefleet.protocols.errors import RecordRejected
from idlefleet.protocols.gossip import NoticeGossip, RecordGossip, capacity_topic, check_gossip
from idlefleet.protocols.notices import PeerDownNotice, encode_notice
from idlefleet.protocols.peerid import peer_id_from_public_key
from idlefleet.protocols.records import encode_signed
from tests.factories import T0, capacity_record

KEY = Ed25519PrivateKey.from_private_bytes(b"\x31" * 32)
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x32" * 32)


def pid(key: Ed25519PrivateKey) -> str:
    return peer_id_from_public_key(key.public_key().public_bytes_raw())


A, B = pid(KEY), pid(OTHER_KEY)
RAW = encode_signed(capacity_record(KEY, seq=5), KEY)
NOTICE = encode_notice(PeerDownNotice(A, B, 3, T0, "2 missed heartbeat(s)"), KEY)


def check(data: bytes, origin: str = A, me: str = "me", *, floor: int | None = None,
          held: bytes | None = None) -> Any:
    return check_gossip(data, origin, me, T0 + 1, last_seq=lambda p: floor, held=lambda p: held)


def reason(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(RecordRejected) as exc:
        check(data, **kwargs)
    return exc.value.reason


def test_topic_name() -> None:
    assert capacity_topic("u33d") == "/idlefleet/v1/capacity/u33d"


def test_a_valid_record_and_a_valid_notice() -> None:
    got = check(wire.encode_envelope("capacity", {"record": RAW}))
    assert isinstance(got, RecordGossip) and got.record.seq == 5 and got.raw == RAW
    got = check(wire.encode_envelope("peer_down", {"notice": NOTICE}))
    assert isinstance(got, NoticeGossip) and got.notice.subject == B


def test_the_record_already_held_is_a_silent_duplicate() -> None:
    assert check(wire.encode_envelope("capacity", {"record": RAW}), held=RAW) is None


@pytest.mark.parametrize(("data", "kwargs", "why"), [
    (b"\x00garbage", {}, "malformed"),
    (wire.encode_envelope("heartbeat", {"nonce": 1}), {}, "malformed"),
    (wire.encode_envelope("capacity", {"record": "text"}), {}, "malformed"),
    (wire.encode_envelope("capacity", {"record": RAW, "extra": 1}), {}, "malformed"),
    (wire.encode_envelope("capacity", {"record": RAW}), {"origin": B}, "source_mismatch"),
    (wire.encode_envelope("capacity", {"record": RAW}), {"me": A}, "source_mismatch"),
    (wire.encode_envelope("capacity", {"record": RAW}), {"floor": 5}, "stale_sequence"),
    (wire.encode_envelope("peer_down", {"notice": NOTICE}), {"origin": B}, "source_mismatch"),
    (wire.encode_envelope("peer_down", {"notice": b"\x80"}), {}, "bad_notice"),
    (wire.encode_envelope("peer_down", {}), {}, "malformed"),
])
def test_rejections_name_their_reason(data: bytes, kwargs: dict[str, Any], why: str) -> None:
    assert reason(data, **kwargs) == why
