"""Signed capacity records: round trip, every rejection reason, forgeries, replays and fuzzing."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.protocols.errors import LocalProtocolError, RecordInvalid, RecordRejected, RemoteProtocolError
from idlefleet.protocols.peerid import peer_id_from_public_key
from idlefleet.protocols.records import (
    DOMAIN,
    MAX_RECORD_SIZE,
    MAX_TTL,
    OPTIONAL_FIELDS,
    RECORD_FIELDS,
    REJECT_REASONS,
    CapacityRecord,
    encode_body,
    encode_signed,
    record_to_dict,
    validate_record,
)

VECTOR_KEY = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)
T0 = 1700000100.0  # issued_at of the test records
NOW = T0 + 100.0

# The worked example of docs/PROTOCOL.md section 3.6: VECTOR_RECORD signed with VECTOR_KEY.
VECTOR_HEX = (
    "82a4626f6479c5022ade0018a17601a7706565725f6964d934313244334b6f6f574b3939566f56784e45"
    "37587a79427758457a573778684b37477076383572394633563366794b53554b504835aa7075626c6963"
    "5f6b6579c4208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5ca5616464"
    "727391b72f6970342f3139322e302e322e372f7463702f34303031a6726567696f6ea57533336462a573"
    "74617465a66f6e6c696e65ab626174746572795f736f63cb3fe999999999999aaa706c75676765645f69"
    "6ec3ab6368617267696e675f6b77cb4026000000000000b2746865726d616c5f68656164726f6f6d5f63"
    "cb4039800000000000ac7061726b65645f73696e6365cb41d954fc40000000b265787065637465645f64"
    "6570617274757265c0a7636f6e73656e74c3af636f6e73656e745f65787069726573cb41d95550a00000"
    "00a96c696e6b5f6b696e64a477696669ac6c696e6b5f6d657465726564c2ae636f6d707574655f67666c"
    "6f7073cb408f400000000000ae667265655f6d656d6f72795f6d62cd2000a46c6f6164cb3fd000000000"
    "0000a86d6f64656c5f6964d94c676775662d7368613235363a6231373963393532336430653661306639"
    "386133333063373536326236383237353061366638633863313565356263373065613337333732383131"
    "3064623533a6626c6f636b7392000aa373657101a96973737565645f6174cb41d954fc59000000aa6578"
    "70697265735f6174cb41d954fca4000000a3736967c4406cc70923695a34540822fe940c73ab9818d4ca"
    "591412f0a2ab30f8cdd99d64b2ac1570c3f7f26c15096c43223fbc4390f202ed34ce70090f7f25ec60fe"
    "b65c0d"
)
PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


def pub(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def make_record(key: Ed25519PrivateKey = VECTOR_KEY, **changes: Any) -> CapacityRecord:
    fields: dict[str, Any] = {
        "peer_id": peer_id_from_public_key(pub(key)),
        "public_key": pub(key),
        "addrs": ("/ip4/192.0.2.7/tcp/4001",),
        "region": "u33db",
        "state": "online",
        "battery_soc": 0.8,
        "plugged_in": True,
        "charging_kw": 11.0,
        "thermal_headroom_c": 25.5,
        "parked_since": 1700000000.0,
        "expected_departure": None,
        "consent": True,
        "consent_expires": 1700086400.0,
        "link_kind": "wifi",
        "link_metered": False,
        "compute_gflops": 1000.0,
        "free_memory_mb": 8192,
        "load": 0.25,
        "model_id": "gguf-sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "blocks": (0, 10),
        "seq": 1,
        "issued_at": T0,
        "expires_at": T0 + 300.0,
    }
    fields.update(changes)
    return CapacityRecord(**fields)


def body_dict(record: CapacityRecord) -> dict[str, Any]:
    return msgpack.unpackb(encode_body(record))


def sign_raw(body: dict[str, Any] | bytes, key: Ed25519PrivateKey = VECTOR_KEY) -> bytes:
    """Sign an arbitrary body the way encode_signed does, bypassing CapacityRecord checks."""
    raw = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
    return msgpack.packb({"body": raw, "sig": key.sign(DOMAIN + raw)}, use_bin_type=True)


def rejected(data: bytes, now: float = NOW, **kwargs: Any) -> RecordRejected:
    with pytest.raises(RecordRejected) as info:
        validate_record(data, now, **kwargs)
    assert info.value.reason in REJECT_REASONS
    return info.value


# --- round trip and test vector ---------------------------------------------------------------


def test_sign_verify_round_trip() -> None:
    record = make_record()
    assert validate_record(encode_signed(record, VECTOR_KEY), NOW) == record


def test_vector_matches_code() -> None:
    data = encode_signed(make_record(), VECTOR_KEY)
    assert data.hex() == VECTOR_HEX
    assert validate_record(bytes.fromhex(VECTOR_HEX), NOW) == make_record()


def test_vector_matches_docs() -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    match = re.search(r"<!-- test-vector: signed-record -->\s*```text\n(.*?)```", text, re.S)
    assert match, "docs/PROTOCOL.md lacks the signed-record test vector block"
    assert re.sub(r"\s+", "", match.group(1)) == VECTOR_HEX
    # The doc also spells out the signing input prefix.
    assert DOMAIN.hex() in re.sub(r"\s+", "", text)


def test_body_is_fields_in_order_with_version_first() -> None:
    body = body_dict(make_record())
    assert list(body) == ["v", *(f for f in RECORD_FIELDS if f not in OPTIONAL_FIELDS)]
    assert body["v"] == 1
    # The owner decision is only on the wire when it is not the default (serve, ok).
    body = body_dict(make_record(policy="drain", policy_reason="consent_revoked"))
    assert list(body) == ["v", *RECORD_FIELDS]


def test_policy_fields_round_trip_and_default_when_absent() -> None:
    record = make_record(policy="stop", policy_reason="driving")
    assert validate_record(encode_signed(record, VECTOR_KEY), NOW) == record
    assert validate_record(encode_signed(make_record(), VECTOR_KEY), NOW).policy == "serve"
    for changes, what in (({"policy": "pause"}, "policy"), ({"policy_reason": ""}, "policy_reason"),
                          ({"policy_reason": "x" * 33}, "policy_reason"),
                          ({"policy_reason": "bad\x1b"}, "policy_reason")):
        body = body_dict(make_record())
        body.update(changes)
        err = rejected(sign_raw(body))
        assert err.reason == "out_of_range" and what in err.detail


def test_max_sized_record_fits() -> None:
    record = make_record(
        addrs=tuple("/dns4/" + "a" * 250 for _ in range(8)),
        model_id="m" * 128,
        region="u33dbfkcm2bc",
        parked_since=1e10,
        expected_departure=1e10,
        consent_expires=1e10,
        blocks=(99_999, 100_000),
        seq=2**63 - 1,
        free_memory_mb=10_000_000,
    )
    data = encode_signed(record, VECTOR_KEY)
    assert len(data) <= MAX_RECORD_SIZE
    assert validate_record(data, NOW) == record


def test_encode_signed_refuses_wrong_key() -> None:
    with pytest.raises(LocalProtocolError, match="does not match"):
        encode_signed(make_record(), OTHER_KEY)


def test_record_to_dict_is_json_friendly() -> None:
    out = record_to_dict(make_record())
    assert list(out) == list(RECORD_FIELDS)
    assert out["public_key"] == pub(VECTOR_KEY).hex()
    assert out["blocks"] == [0, 10]
    assert out["addrs"] == ["/ip4/192.0.2.7/tcp/4001"]
    assert json.loads(json.dumps(out)) == out


def test_replace_revalidates() -> None:
    record = make_record()
    assert dataclasses.replace(record, seq=2).seq == 2
    with pytest.raises(RecordInvalid, match="battery_soc"):
        dataclasses.replace(record, battery_soc=2.0)


# --- construction -----------------------------------------------------------------------------


def test_float_fields_accept_ints_and_store_floats() -> None:
    record = make_record(battery_soc=1, charging_kw=0, issued_at=int(T0), expires_at=int(T0) + 600)
    assert type(record.battery_soc) is float
    assert record.battery_soc == 1.0
    assert type(record.issued_at) is float


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("plugged_in", 1),
        ("consent", "yes"),
        ("link_metered", None),
        ("free_memory_mb", True),
        ("free_memory_mb", 1.0),
        ("seq", 1.0),
        ("battery_soc", True),
        ("battery_soc", "0.5"),
        ("battery_soc", None),
        ("addrs", ["/ip4/1.2.3.4/tcp/1"]),
        ("addrs", ("/ok", 5)),
        ("blocks", [0, 1]),
        ("blocks", (0, 1, 2)),
        ("blocks", (0.0, 1)),
        ("blocks", (False, True)),
        ("region", 5),
        ("state", None),
        ("model_id", b"m"),
        ("public_key", "ab" * 16),
        ("public_key", b"\x01" * 31),
        ("peer_id", None),
    ],
)
def test_construction_rejects_wrong_types(field: str, value: Any) -> None:
    with pytest.raises(RecordInvalid) as info:
        make_record(**{field: value})
    assert info.value.reason == "malformed"
    assert field in info.value.detail


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("battery_soc", -0.01),
        ("battery_soc", 1.01),
        ("battery_soc", math.nan),
        ("battery_soc", 10**400),
        ("charging_kw", 350.5),
        ("thermal_headroom_c", -101.0),
        ("thermal_headroom_c", 201.0),
        ("thermal_headroom_c", math.inf),
        ("parked_since", -1.0),
        ("expected_departure", math.nan),
        ("consent_expires", 1e11),
        ("compute_gflops", 1e6 + 1),
        ("free_memory_mb", -1),
        ("free_memory_mb", 10_000_001),
        ("load", 1.5),
        ("seq", -1),
        ("seq", 2**63),
        ("state", "asleep"),
        ("link_kind", "satellite"),
        ("region", ""),
        ("region", "u33dbu33dbu33"),
        ("region", "u33a"),  # 'a' is not in the geohash alphabet
        ("region", "U33D"),
        ("addrs", tuple(f"/ip4/10.0.0.{i}/tcp/1" for i in range(9))),
        ("addrs", ("",)),
        ("addrs", ("ip4/1.2.3.4/tcp/1",)),
        ("addrs", ("/" + "a" * 256,)),
        ("addrs", ("/ip4/1.2.3.4/tcp/1\x1b[2J",)),
        ("model_id", "m" * 129),
        ("model_id", "model\nid"),
        ("blocks", (5, 5)),
        ("blocks", (-1, 5)),
        ("blocks", (0, 100_001)),
        ("issued_at", math.nan),
        ("expires_at", T0),
        ("expires_at", T0 - 1),
        ("expires_at", T0 + MAX_TTL + 0.001),
    ],
)
def test_construction_rejects_out_of_range(field: str, value: Any) -> None:
    with pytest.raises(RecordInvalid) as info:
        make_record(**{field: value})
    assert info.value.reason == "out_of_range"
    assert field in info.value.detail


def test_blocks_need_a_model() -> None:
    with pytest.raises(RecordInvalid, match="blocks: a block range needs a model_id"):
        make_record(model_id="", blocks=(0, 1))
    assert make_record(model_id="", blocks=None).blocks is None


def test_construction_rejects_foreign_peer_id() -> None:
    with pytest.raises(RecordInvalid) as info:
        make_record(peer_id=peer_id_from_public_key(pub(OTHER_KEY)))
    assert info.value.reason == "signer_mismatch"


# --- every rejection reason on the wire -------------------------------------------------------


def test_reasons_are_exactly_the_documented_set() -> None:
    assert set(REJECT_REASONS) == {
        "oversized",
        "malformed",
        "unknown_version",
        "missing_field",
        "out_of_range",
        "bad_signature",
        "signer_mismatch",
        "expired",
        "not_yet_valid",
        "stale_sequence",
    }


def test_oversized() -> None:
    data = encode_signed(make_record(), VECTOR_KEY)
    assert rejected(data, max_size=len(data) - 1).reason == "oversized"
    assert rejected(b"\x00" * (MAX_RECORD_SIZE + 1)).reason == "oversized"
    assert validate_record(data, NOW, max_size=len(data)) == make_record()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgpack.packb([b"body", b"sig"]),
        msgpack.packb({"body": b"x"}),
        msgpack.packb({"body": b"x", "sig": b"s" * 64, "extra": 1}),
        msgpack.packb({"body": "text", "sig": b"s" * 64}),
        msgpack.packb({"body": b"\x80", "sig": b"s" * 63}),
        msgpack.packb({"body": b"\x80", "sig": "s" * 64}),
        msgpack.packb({"body": b"\xc1", "sig": b"s" * 64}),  # body not msgpack
        msgpack.packb({"body": msgpack.packb([1]), "sig": b"s" * 64}),  # body not a map
        msgpack.packb({"body": b"\x80", "sig": b"s" * 64}) + b"\x00",  # trailing bytes
    ],
)
def test_malformed_wrapper(data: bytes) -> None:
    assert rejected(data).reason == "malformed"


def test_malformed_signed_field_type() -> None:
    body = body_dict(make_record())
    body["plugged_in"] = 1
    err = rejected(sign_raw(body))
    assert (err.reason, err.detail) == ("malformed", "plugged_in: expected bool, got int")


def test_malformed_signed_unknown_field() -> None:
    body = body_dict(make_record())
    body["surprise"] = 1
    err = rejected(sign_raw(body))
    assert err.reason == "malformed"
    assert "surprise" in err.detail


def test_malformed_signed_duplicate_key() -> None:
    # Two "battery_soc" entries: first-wins and last-wins readers would disagree, so refuse.
    body = encode_body(make_record())
    needle = b"\xabbattery_soc\xcb"
    i = body.index(needle) + len(needle) + 8
    dup = b"\xde\x00\x19" + body[3:i] + needle + b"\x00" * 8 + body[i:]
    assert body[:3] == b"\xde\x00\x18"
    err = rejected(sign_raw(dup))
    assert err.reason == "malformed"
    assert "duplicate map key 'battery_soc'" in err.detail


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version(version: int) -> None:
    body = body_dict(make_record())
    body["v"] = version
    assert rejected(sign_raw(body)).reason == "unknown_version"


def test_version_before_signature() -> None:
    # A v2 record is reported as unknown_version even if we cannot check its signature scheme.
    body = body_dict(make_record())
    body["v"] = 2
    body["public_key"] = "a v2 key format"
    assert rejected(sign_raw(body)).reason == "unknown_version"


@pytest.mark.parametrize("field", ["v", "public_key", "peer_id",
                                   *(f for f in RECORD_FIELDS if f not in OPTIONAL_FIELDS)])
def test_missing_field(field: str) -> None:
    body = body_dict(make_record())
    del body[field]
    err = rejected(sign_raw(body))
    assert (err.reason, err.detail) == ("missing_field", field)


def test_out_of_range_signed_field() -> None:
    body = body_dict(make_record())
    body["battery_soc"] = 1.5
    err = rejected(sign_raw(body))
    assert err.reason == "out_of_range"
    assert "battery_soc" in err.detail


def test_bad_signature_flipped_sig_bit() -> None:
    data = bytearray(encode_signed(make_record(), VECTOR_KEY))
    data[-1] ^= 0x01
    assert rejected(bytes(data)).reason == "bad_signature"


def test_bad_signature_tampered_body() -> None:
    # A relay raises the advertised battery level without the key: the signature breaks.
    data = encode_signed(make_record(battery_soc=0.25), VECTOR_KEY)
    outer = msgpack.unpackb(data)
    outer["body"] = encode_body(make_record(battery_soc=0.75))
    assert rejected(msgpack.packb(outer)).reason == "bad_signature"


def test_bad_signature_without_domain_prefix() -> None:
    # A signature over the bare body (no domain separation) must not verify.
    body = encode_body(make_record())
    data = msgpack.packb({"body": body, "sig": VECTOR_KEY.sign(body)})
    assert rejected(data).reason == "bad_signature"


def test_forged_record_signed_by_another_key() -> None:
    """An attacker claims the victim's peer id and public key but signs with their own key."""
    body = encode_body(make_record(VECTOR_KEY))  # victim's identity
    assert rejected(sign_raw(body, OTHER_KEY)).reason == "bad_signature"


def test_peer_claiming_another_identity() -> None:
    """A correctly self-signed record whose peer_id is someone else's: signer_mismatch."""
    body = body_dict(make_record(OTHER_KEY))  # attacker's key and signature...
    body["peer_id"] = peer_id_from_public_key(pub(VECTOR_KEY))  # ...victim's peer id
    err = rejected(sign_raw(body, OTHER_KEY))
    assert err.reason == "signer_mismatch"


def test_peer_id_of_wrong_type_is_malformed() -> None:
    body = body_dict(make_record())
    body["peer_id"] = 12
    assert rejected(sign_raw(body)).reason == "malformed"


def test_expired() -> None:
    data = encode_signed(make_record(), VECTOR_KEY)
    assert rejected(data, now=T0 + 300.0).reason == "expired"  # now == expires_at
    assert rejected(data, now=T0 + 1e6).reason == "expired"
    assert validate_record(data, T0 + 299.999).seq == 1


def test_not_yet_valid() -> None:
    data = encode_signed(make_record(), VECTOR_KEY)
    assert rejected(data, now=T0 - 30.001).reason == "not_yet_valid"
    assert rejected(data, now=T0 - 5.0, max_clock_skew=1.0).reason == "not_yet_valid"
    assert validate_record(data, T0 - 30.0).seq == 1  # within the default skew


def test_stale_sequence_replay() -> None:
    """A replayed old record (or the same one again) is refused once a newer seq was seen."""
    old = encode_signed(make_record(seq=5, battery_soc=0.9), VECTOR_KEY)
    new = encode_signed(make_record(seq=6, battery_soc=0.4), VECTOR_KEY)
    last_seq = validate_record(old, NOW).seq
    last_seq = validate_record(new, NOW, last_seq=last_seq).seq
    assert rejected(old, last_seq=last_seq).reason == "stale_sequence"
    assert rejected(new, last_seq=last_seq).reason == "stale_sequence"
    assert validate_record(new, NOW, last_seq=None).seq == 6


def test_non_finite_now_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        validate_record(encode_signed(make_record(), VECTOR_KEY), math.nan)


def test_every_reason_has_a_test() -> None:
    tested = {
        "oversized": test_oversized,
        "malformed": test_malformed_wrapper,
        "unknown_version": test_unknown_version,
        "missing_field": test_missing_field,
        "out_of_range": test_out_of_range_signed_field,
        "bad_signature": test_bad_signature_flipped_sig_bit,
        "signer_mismatch": test_peer_claiming_another_identity,
        "expired": test_expired,
        "not_yet_valid": test_not_yet_valid,
        "stale_sequence": test_stale_sequence_replay,
    }
    assert set(tested) == set(REJECT_REASONS)


# --- validation order -------------------------------------------------------------------------


def test_order_signature_before_fields() -> None:
    # Out-of-range content under a broken signature is blamed on the signature: the content was
    # never vouched for by the key, so it says nothing about that peer.
    body = body_dict(make_record())
    body["battery_soc"] = 7.0
    data = msgpack.unpackb(sign_raw(body))
    data["sig"] = bytes(64)
    assert rejected(msgpack.packb(data)).reason == "bad_signature"


def test_order_fields_before_time_before_sequence() -> None:
    body = body_dict(make_record(seq=1))
    body["load"] = 2.0
    assert rejected(sign_raw(body), now=T0 + 1e6, last_seq=10).reason == "out_of_range"
    expired = encode_signed(make_record(seq=1), VECTOR_KEY)
    assert rejected(expired, now=T0 + 1e6, last_seq=10).reason == "expired"


# --- fuzzing ----------------------------------------------------------------------------------


def _validate_or_reject(data: bytes) -> CapacityRecord | None:
    try:
        return validate_record(data, NOW)
    except RecordRejected:
        return None
    except RemoteProtocolError as e:  # pragma: no cover - would be a bug
        raise AssertionError(f"non-RecordRejected error: {e!r}") from e


def test_fuzz_bit_flips_never_accepted() -> None:
    data = encode_signed(make_record(), VECTOR_KEY)
    rng = np.random.default_rng(5)
    # Every single bit, then random multi-bit flips.
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert _validate_or_reject(bytes(flipped)) is None, f"bit {bit} flip was accepted"
    for _ in range(1000):
        flipped = bytearray(data)
        for bit in rng.integers(0, len(data) * 8, int(rng.integers(2, 9))):
            flipped[bit // 8] ^= 1 << (bit % 8)
        if bytes(flipped) != data:
            assert _validate_or_reject(bytes(flipped)) is None


def test_fuzz_truncations_and_extensions() -> None:
    data = encode_signed(make_record(), VECTOR_KEY)
    for cut in range(len(data)):
        assert _validate_or_reject(data[:cut]) is None
    for extra in (b"\x00", b"\xc0", data):
        assert _validate_or_reject(data + extra) is None


def test_fuzz_random_bytes() -> None:
    rng = np.random.default_rng(6)
    prefix = encode_signed(make_record(), VECTOR_KEY)[:40]
    for _ in range(2000):
        noise = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
        assert _validate_or_reject(noise) is None
        assert _validate_or_reject(prefix + noise) is None
