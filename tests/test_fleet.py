"""FleetView: accepting records, peer-down notices and their refutation, expiry, pruning, replay floors."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.protocols.errors import RecordRejected
from idlefleet.protocols.fleet import FleetView
from idlefleet.protocols.peerid import peer_id_from_public_key
from idlefleet.protocols.records import CapacityRecord, encode_signed, validate_record
from tests.factories import T0, capacity_record

KEY_A = Ed25519PrivateKey.from_private_bytes(b"\x11" * 32)
KEY_B = Ed25519PrivateKey.from_private_bytes(b"\x22" * 32)

TTL = 60.0


def peer_of(key: Ed25519PrivateKey) -> str:
    return peer_id_from_public_key(key.public_key().public_bytes_raw())


A = peer_of(KEY_A)
B = peer_of(KEY_B)


def make_record(key: Ed25519PrivateKey = KEY_A, **overrides: Any) -> CapacityRecord:
    """A valid record of ``key``'s peer issued at ``T0`` (or ``issued_at``), with ``overrides``."""
    return capacity_record(key, ttl=TTL, **overrides)


def accept(view: FleetView, now: float, key: Ed25519PrivateKey = KEY_A, **overrides: Any) -> CapacityRecord:
    """Feed ``view`` a record the way a node does: validate against the view's floor, then accept."""
    raw = encode_signed(make_record(key, **overrides), key)
    record = validate_record(raw, now, last_seq=view.last_seq(peer_of(key)))
    view.accept(record, raw, now)
    return record


# --- accept / is_alive -----------------------------------------------------------------------


def test_accept_new_peer_makes_it_alive_and_keeps_the_signed_bytes() -> None:
    view = FleetView()
    record = make_record(seq=7)
    raw = encode_signed(record, KEY_A)

    assert view.accept(record, raw, T0 + 1) is True

    assert view.is_alive(A, T0 + 1)
    entry = view.get(A)
    assert entry is not None
    assert entry.record == record
    assert entry.raw == raw
    assert entry.received_at == T0 + 1
    assert validate_record(entry.raw, T0 + 2) == record  # forwardable as is
    assert view.last_seq(A) == 7
    assert view.changes == 1


def test_unknown_peer_is_not_alive() -> None:
    view = FleetView()
    assert not view.is_alive(A, T0)
    assert view.get(A) is None
    assert view.last_seq(A) is None
    assert view.alive(T0) == []


def test_newer_record_replaces_older() -> None:
    view = FleetView()
    accept(view, T0, seq=1, battery_soc=0.5)
    accept(view, T0 + 5, seq=2, battery_soc=0.4, issued_at=T0 + 5)

    entry = view.get(A)
    assert entry is not None
    assert entry.record.seq == 2
    assert entry.record.battery_soc == 0.4
    assert view.last_seq(A) == 2
    assert view.changes == 2


def test_alive_lists_live_peers_sorted_by_peer_id() -> None:
    view = FleetView()
    accept(view, T0, KEY_A)
    accept(view, T0, KEY_B)
    assert [e.record.peer_id for e in view.alive(T0 + 1)] == sorted([A, B])


def test_record_is_alive_until_exactly_its_expiry() -> None:
    view = FleetView()
    accept(view, T0, seq=1)
    assert view.is_alive(A, T0 + TTL - 0.001)
    assert not view.is_alive(A, T0 + TTL)  # expires_at <= now: dead, like validate_record's "expired"
    assert not view.is_alive(A, T0 + TTL + 1)
    assert view.alive(T0 + TTL) == []


def test_offline_record_is_not_alive_but_is_kept_with_its_floor() -> None:
    view = FleetView()
    accept(view, T0, seq=1)
    accept(view, T0 + 1, seq=2, state="offline", issued_at=T0 + 1)

    assert not view.is_alive(A, T0 + 2)
    assert view.alive(T0 + 2) == []
    assert view.last_seq(A) == 2
    # The earlier "online" record, replayed, is refused by the floor.
    old = encode_signed(make_record(seq=1), KEY_A)
    with pytest.raises(RecordRejected) as exc:
        validate_record(old, T0 + 3, last_seq=view.last_seq(A))
    assert exc.value.reason == "stale_sequence"


@pytest.mark.parametrize("state", ["joining", "online", "draining"])
def test_every_state_but_offline_is_alive(state: str) -> None:
    view = FleetView()
    accept(view, T0, state=state)
    assert view.is_alive(A, T0 + 1)


# --- peer-down notices ------------------------------------------------------------------------


def test_mark_down_covering_the_latest_record_kills_the_peer_once() -> None:
    view = FleetView()
    accept(view, T0, seq=5)
    changes = view.changes

    assert view.mark_down(A, 5, T0 + 1) is True
    assert not view.is_alive(A, T0 + 1)
    assert view.alive(T0 + 1) == []
    assert view.changes == changes + 1
    # A second notice about an already-dead peer changes nothing.
    assert view.mark_down(A, 5, T0 + 2) is False
    assert view.changes == changes + 1
    # The record itself and its floor are still there (the notice hides it, it does not delete it).
    assert view.get(A) is not None
    assert view.last_seq(A) == 5


def test_mark_down_is_bounded_by_the_highest_seq_seen() -> None:
    # Finding 2 of issue 8: a notice with subject_seq = 2**63 - 1 made every later record of its
    # subject dead for 600 s. The cover is bounded by what the view has seen: the next record refutes.
    view = FleetView()
    accept(view, T0, seq=5)
    assert view.mark_down(A, 2**63 - 1, T0 + 1) is True
    assert not view.is_alive(A, T0 + 1)
    accept(view, T0 + 2, seq=6, issued_at=T0 + 2)
    assert view.is_alive(A, T0 + 2)


def test_stale_notice_for_an_older_record_does_not_kill() -> None:
    view = FleetView()
    accept(view, T0, seq=5)
    assert view.mark_down(A, 4, T0 + 1) is False
    assert view.is_alive(A, T0 + 1)
    assert view.changes == 1


def test_higher_seq_record_refutes_a_notice() -> None:
    view = FleetView()
    accept(view, T0, seq=5)
    view.mark_down(A, 5, T0 + 1)

    accept(view, T0 + 2, seq=6, issued_at=T0 + 2)

    assert view.is_alive(A, T0 + 2)
    # The refuted notice is gone: it cannot apply again, even to a record it once covered.
    assert view.mark_down(A, 5, T0 + 3) is False
    assert view.is_alive(A, T0 + 3)


def test_notice_about_an_unknown_peer_covers_nothing() -> None:
    # Nothing seen, nothing to cover: a notice cannot pre-emptively bury a peer's future records.
    view = FleetView()
    assert view.mark_down(A, 2**63 - 1, T0) is False
    accept(view, T0 + 1, seq=5)
    assert view.is_alive(A, T0 + 1)


def test_notices_keep_the_highest_covered_seq() -> None:
    view = FleetView()
    accept(view, T0, seq=8)
    view.mark_down(A, 8, T0)
    view.mark_down(A, 3, T0 + 1)  # an older notice arriving late must not lower the cover
    assert not view.is_alive(A, T0 + 2)
    accept(view, T0 + 3, seq=9, issued_at=T0 + 3)
    assert view.is_alive(A, T0 + 3)


def test_mark_down_only_affects_its_subject() -> None:
    view = FleetView()
    accept(view, T0, KEY_A, seq=1)
    accept(view, T0, KEY_B, seq=1)
    view.mark_down(A, 1, T0 + 1)
    assert [e.record.peer_id for e in view.alive(T0 + 1)] == [B]


# --- prune and replay floors ------------------------------------------------------------------


def test_prune_drops_expired_entries_and_their_floors() -> None:
    view = FleetView()
    accept(view, T0, KEY_A, seq=3)
    accept(view, T0 + 30, KEY_B, seq=4, issued_at=T0 + 30)

    view.prune(T0 + TTL - 1)
    assert view.get(A) is not None
    assert view.last_seq(A) == 3

    view.prune(T0 + TTL)
    assert view.get(A) is None
    assert view.last_seq(A) is None  # any record it could stop is expired, so rejected anyway
    assert view.get(B) is not None  # not yet expired
    assert view.last_seq(B) == 4


def test_prune_keeps_notices_until_their_hold_ends() -> None:
    view = FleetView()
    raw = encode_signed(make_record(seq=5, expires_at=T0 + 300), KEY_A)
    view.accept(validate_record(raw, T0), raw, T0)
    view.mark_down(A, 5, T0, hold_s=100.0)

    view.prune(T0 + 99)
    assert not view.is_alive(A, T0 + 99)

    view.prune(T0 + 100)  # notice forgotten: the same record is no longer covered
    assert view.is_alive(A, T0 + 100)


def test_floor_survives_a_peer_going_down_until_its_record_expires() -> None:
    view = FleetView()
    accept(view, T0, seq=10)
    view.mark_down(A, 10, T0 + 1)
    view.prune(T0 + 30)

    assert view.last_seq(A) == 10
    replay = encode_signed(make_record(seq=9, issued_at=T0 - 10), KEY_A)
    with pytest.raises(RecordRejected) as exc:
        validate_record(replay, T0 + 30, last_seq=view.last_seq(A))
    assert exc.value.reason == "stale_sequence"
    assert not view.is_alive(A, T0 + 30)


def test_floor_outlives_an_earlier_expiring_newer_record() -> None:
    # seq 5 lives 600 s; seq 6 (say after a restart with a shorter TTL) only 30 s. Once seq 6 has
    # expired and been pruned, a replay of seq 5 (still unexpired) must not resurrect the peer.
    view = FleetView()
    old_raw = encode_signed(make_record(seq=5, expires_at=T0 + 600), KEY_A)
    view.accept(validate_record(old_raw, T0), old_raw, T0)
    accept(view, T0 + 1, seq=6, issued_at=T0 + 1, expires_at=T0 + 31)

    view.prune(T0 + 40)

    assert view.last_seq(A) == 6
    with pytest.raises(RecordRejected) as exc:
        validate_record(old_raw, T0 + 40, last_seq=view.last_seq(A))
    assert exc.value.reason == "stale_sequence"
    view.prune(T0 + 600)  # now every record up to seq 6 has expired: the floor can go
    assert view.last_seq(A) is None


def test_prune_on_an_empty_view_is_harmless() -> None:
    view = FleetView()
    view.prune(T0)
    assert view.alive(T0) == []


# --- bound, verification and preference (finding 3 of issue 8) ---------------------------------------


def fresh_keys(n: int) -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.from_private_bytes(i.to_bytes(2, "big") * 16) for i in range(1, n + 1)]


def test_view_is_bounded_and_strangers_only_displace_strangers() -> None:
    view = FleetView(max_entries=4)
    honest = fresh_keys(2)
    for key in honest:
        accept(view, T0, key, seq=1)
        view.mark_verified(peer_of(key), T0)
    for i, key in enumerate(fresh_keys(40)[2:]):
        accept(view, T0 + 1 + i / 100, key, seq=1)
    assert len(view) == 4
    alive = {e.record.peer_id for e in view.alive(T0 + 2)}
    assert {peer_of(k) for k in honest} <= alive


def test_full_view_of_verified_live_peers_refuses_a_stranger() -> None:
    view = FleetView(max_entries=2)
    for key in (KEY_A, KEY_B):
        accept(view, T0, key, seq=1)
        view.mark_verified(peer_of(key), T0)
    stranger = fresh_keys(1)[0]
    raw = encode_signed(make_record(stranger, seq=1), stranger)
    assert view.accept(validate_record(raw, T0), raw, T0) is False
    assert view.get(peer_of(stranger)) is None
    assert {e.record.peer_id for e in view.alive(T0)} == {A, B}


def test_full_view_evicts_a_dead_entry_before_an_unverified_live_one() -> None:
    view = FleetView(max_entries=2)
    accept(view, T0, KEY_A, seq=1, state="offline")
    accept(view, T0, KEY_B, seq=1)
    stranger = fresh_keys(1)[0]
    accept(view, T0 + 1, stranger, seq=1)
    assert view.get(A) is None
    assert view.get(B) is not None


def test_preferred_puts_verified_peers_before_sort_order() -> None:
    view = FleetView()
    keys = fresh_keys(30)
    for key in keys:
        accept(view, T0, key, seq=1)
    honest = sorted(peer_of(k) for k in keys)[-2:]  # last in peer id order
    view.mark_verified(honest[0], T0 + 1)
    view.mark_verified(honest[1], T0 + 2)
    top = [e.record.peer_id for e in view.preferred(T0 + 3, limit=3)]
    assert top[:2] == [honest[1], honest[0]]
    assert len(view.preferred(T0 + 3, limit=1000)) == 30


def test_mark_down_clears_verification() -> None:
    view = FleetView()
    accept(view, T0, seq=1)
    view.mark_verified(A, T0)
    view.mark_down(A, 1, T0 + 1)
    assert view.verified_at(A) is None
