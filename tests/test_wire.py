"""Envelope codec and length-prefix framing: round trips, every rejection, and fuzzing."""

from __future__ import annotations

import contextlib
import random
import struct
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from idlefleet.protocols import wire
from idlefleet.protocols.errors import LocalProtocolError, RemoteProtocolError
from idlefleet.protocols.messages import (
    MAX_STATUS_RECORDS,
    ErrorMessage,
    Heartbeat,
    HeartbeatAck,
    Message,
    StatusRequest,
    StatusResponse,
    decode_message,
    encode_message,
)
from idlefleet.protocols.wire import (
    KINDS,
    MAX_DEPTH,
    MAX_FRAME,
    PROTOCOL_VERSION,
    Envelope,
    FrameDecoder,
    decode_envelope,
    encode_envelope,
    frame,
    register_kind,
)

BODY: dict[str, Any] = {
    "seq": 7,
    "sent_at": 1700000000.25,
    "ok": True,
    "none": None,
    "name": "héllo",
    "raw": b"\x00\xff",
    "list": [1, -2, 3.5, "x", [b"y"]],
    "map": {"a": {"b": {}}},
}


def raw_envelope(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.fixture
def kinds(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A private copy of the kinds registry so tests can register kinds without leaking them."""
    copy = dict(KINDS)
    monkeypatch.setattr(wire, "KINDS", copy)
    return copy


# --- envelope ---------------------------------------------------------------------------------


def test_round_trip() -> None:
    data = encode_envelope("status_response", BODY)
    assert decode_envelope(data) == Envelope(
        version=PROTOCOL_VERSION, kind="status_response", body=BODY
    )


def test_envelope_layout_is_the_documented_one() -> None:
    # docs/PROTOCOL.md section 2.3
    data = encode_envelope("heartbeat", {"nonce": 1})
    assert data.hex(" ") == (
        "83 a1 76 01 a1 6b a9 68 65 61 72 74 62 65 61 74 a1 62 81 a5 6e 6f 6e 63 65 01"
    )
    doc = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text("utf-8")
    assert data.hex(" ") in doc


def test_tuples_encode_as_arrays() -> None:
    env = decode_envelope(encode_envelope("heartbeat", {"pair": (1, 2)}))
    assert env.body == {"pair": [1, 2]}


def test_default_kinds_registered() -> None:
    for kind in ("heartbeat", "heartbeat_ack", "status_request", "status_response", "error"):
        assert 0 < KINDS[kind] <= MAX_FRAME


def test_register_kind(kinds: dict[str, int]) -> None:
    register_kind("test_only_kind", 4096)
    register_kind("test_only_kind", 4096)  # idempotent
    assert decode_envelope(encode_envelope("test_only_kind", {})).kind == "test_only_kind"
    with pytest.raises(LocalProtocolError, match="already registered"):
        register_kind("test_only_kind", 8192)
    for name, size in [("", 10), ("x" * 65, 10), ("ok", 0), ("ok", MAX_FRAME + 1), ("ok", True)]:
        with pytest.raises(LocalProtocolError):
            register_kind(name, size)
    assert "ok" not in kinds


@pytest.mark.parametrize(
    ("kind", "body", "match"),
    [
        ("nope", {}, "unknown message kind"),
        ("heartbeat", {"pad": "x" * 300}, "limit 256"),
        ("heartbeat", [1], "must be a dict"),
        ("heartbeat", {1: 2}, "map key must be a string"),
        ("heartbeat", {"s": {1, 2}}, "cannot encode set"),
        ("heartbeat", {"big": 2**64}, "cannot encode"),
    ],
)
def test_encode_rejects(kind: str, body: Any, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode_envelope(kind, body)


def test_encode_rejects_deep_nesting() -> None:
    body: Any = {}
    for _ in range(MAX_DEPTH):
        body = {"x": body}
    with pytest.raises(LocalProtocolError, match="nesting"):
        encode_envelope("status_response", body)


def _deep(depth: int) -> bytes:
    """An envelope nesting `depth` containers: envelope map, body map, then depth-2 arrays."""
    head = b"\x83\xa1v\x01\xa1k\xafstatus_response\xa1b\x81\xa1x"
    return head + b"\x91" * (depth - 2) + b"\x01"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),  # the one never-used msgpack byte
        (raw_envelope({"v": 1, "k": "heartbeat", "b": {}})[:-1], "not valid msgpack"),
        (raw_envelope({"v": 1, "k": "heartbeat", "b": {}}) + b"\x00", "trailing bytes"),
        (raw_envelope([1, "heartbeat", {}]), "not a map"),
        (raw_envelope({"k": "heartbeat", "b": {}}), r"missing key\(s\) \['v'\]"),
        (raw_envelope({"v": 1, "b": {}}), r"missing key\(s\) \['k'\]"),
        (raw_envelope({"v": 1, "k": "heartbeat"}), r"missing key\(s\) \['b'\]"),
        (raw_envelope({"v": 1, "k": "heartbeat", "b": {}, "x": 0}), "unexpected key"),
        (raw_envelope({"v": 2, "k": "heartbeat", "b": {}}), "unknown protocol version 2"),
        (raw_envelope({"v": True, "k": "heartbeat", "b": {}}), "version must be an integer"),
        (raw_envelope({"v": "1", "k": "heartbeat", "b": {}}), "version must be an integer"),
        (raw_envelope({"v": 1, "k": "nope", "b": {}}), "unknown message kind 'nope'"),
        (raw_envelope({"v": 1, "k": b"heartbeat", "b": {}}), "kind must be a string"),
        (raw_envelope({"v": 1, "k": "heartbeat", "b": []}), "body is not a map"),
        (raw_envelope({"v": 1, "k": "heartbeat", "b": {"p": "x" * 300}}), "limit 256"),
        (raw_envelope({"v": 1, "k": "heartbeat", "b": {1: 2}}), "map key"),
        (raw_envelope({"v": 1, "k": "heartbeat", "b": {b"k": 2}}), "map key must be a string"),
        (b"\x83\xa1v\x01\xa1v\x01\xa1k\xa9heartbeat", "duplicate map key 'v'"),
        (
            raw_envelope({"v": 1, "k": "heartbeat", "b": {"e": msgpack.ExtType(5, b"x")}}),
            "ext type 5",
        ),
        (b"\x83\xa1v\x01\xa1k\xa9heartbeat\xa1b\x81\xa1s\xa2\xff\xfe", "not valid UTF-8"),
        (b"\xdb\xff\xff\xff\xff", "not valid msgpack"),  # str32 announcing 4 GiB
        (b"\xc6\xff\xff\xff\xff", "not valid msgpack"),  # bin32 announcing 4 GiB
        (b"\xdd\xff\xff\xff\xff", "not valid msgpack"),  # array32 announcing 4 G items
        (b"\xdf\xff\xff\xff\xff", "not valid msgpack"),  # map32 announcing 4 G pairs
        (_deep(MAX_DEPTH + 1), "nesting deeper"),
        (b"\x91" * 5000, "nesting too deep"),
    ],
)
def test_decode_rejects(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_envelope(data)


def test_decode_accepts_max_depth() -> None:
    assert decode_envelope(_deep(MAX_DEPTH)).kind == "status_response"


def test_decode_rejects_timestamp_ext() -> None:
    data = msgpack.packb(
        {"v": 1, "k": "heartbeat", "b": {"t": msgpack.Timestamp(1, 0)}}, datetime=False
    )
    with pytest.raises(RemoteProtocolError, match="ext type -1"):
        decode_envelope(data)


def test_decode_rejects_beyond_hard_limit() -> None:
    with pytest.raises(RemoteProtocolError, match="hard limit"):
        decode_envelope(b"\x00" * (MAX_FRAME + 1))


def test_oversized_for_kind_but_under_hard_limit() -> None:
    big = raw_envelope({"v": 1, "k": "status_request", "b": {"p": b"x" * 100_000}})
    with pytest.raises(RemoteProtocolError, match="'status_request' envelope is"):
        decode_envelope(big)


# --- framing ----------------------------------------------------------------------------------


def test_frame_layout() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"") == b"\x00\x00\x00\x00"


def test_frame_rejects_oversized_payload() -> None:
    with pytest.raises(LocalProtocolError):
        frame(b"x" * 11, max_frame=10)


def test_decoder_byte_by_byte_and_batched() -> None:
    payloads = [b"", b"a", b"hello" * 100, bytes(range(256))]
    stream = b"".join(frame(p) for p in payloads)
    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        while (p := dec.next_frame()) is not None:
            got.append(p)
    assert got == payloads
    dec.at_eof()

    dec = FrameDecoder()
    dec.feed(stream)
    assert [dec.next_frame() for _ in payloads] == payloads
    assert dec.next_frame() is None
    assert dec.buffered == 0
    dec.at_eof()


def test_oversized_header_fails_before_payload_arrives() -> None:
    dec = FrameDecoder(max_frame=1000)
    with pytest.raises(RemoteProtocolError, match="announces 1001 bytes, limit 1000"):
        dec.feed(struct.pack(">I", 1001))
    # The decoder stays broken: the stream must be dropped.
    with pytest.raises(RemoteProtocolError, match="announces"):
        dec.feed(b"x")
    with pytest.raises(RemoteProtocolError):
        dec.next_frame()


def test_oversized_header_behind_a_good_frame() -> None:
    dec = FrameDecoder(max_frame=1000)
    dec.feed(frame(b"ok") + struct.pack(">I", 2**32 - 1))
    with pytest.raises(RemoteProtocolError, match="announces 4294967295 bytes"):
        dec.next_frame()


def test_default_limit_is_max_frame() -> None:
    dec = FrameDecoder()
    dec.feed(struct.pack(">I", MAX_FRAME))  # exactly the limit is fine
    assert dec.next_frame() is None
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME + 1))


def test_at_eof_detects_truncated_payload() -> None:
    dec = FrameDecoder()
    dec.feed(frame(b"x" * 100)[:50])
    assert dec.next_frame() is None
    with pytest.raises(RemoteProtocolError, match="truncated frame: got 46 of 100 bytes"):
        dec.at_eof()


def test_at_eof_detects_truncated_header() -> None:
    dec = FrameDecoder()
    dec.feed(b"\x00\x00")
    with pytest.raises(RemoteProtocolError, match="truncated frame: got 2 of 4 header bytes"):
        dec.at_eof()


def test_at_eof_with_unread_frame_is_a_local_bug() -> None:
    dec = FrameDecoder()
    dec.feed(frame(b"x"))
    with pytest.raises(LocalProtocolError):
        dec.at_eof()


def test_two_endpoints_over_a_fake_link() -> None:
    """Sender encodes envelopes, the link delivers random-sized chunks, the receiver decodes."""
    rng = random.Random(11)
    sent = [("heartbeat", {"seq": i, "sent_at": i * 0.5}) for i in range(200)]
    link = b"".join(frame(encode_envelope(kind, body)) for kind, body in sent)
    dec = FrameDecoder()
    received = []
    pos = 0
    while pos < len(link):
        n = rng.randrange(1, 40)
        dec.feed(link[pos : pos + n])
        pos += n
        while (payload := dec.next_frame()) is not None:
            env = decode_envelope(payload)
            received.append((env.kind, env.body))
    dec.at_eof()
    assert received == sent


# --- fuzzing ----------------------------------------------------------------------------------


def _valid_envelopes() -> list[bytes]:
    return [
        encode_envelope("heartbeat", {"seq": 3, "sent_at": 1.5}),
        encode_envelope("status_response", BODY),
        encode_envelope("error", {"code": "bad", "message": "x" * 50}),
        encode_envelope("status_request", {}),
    ]


def _decode_or_remote_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_envelope(data)


def test_fuzz_random_bytes() -> None:
    rng = np.random.default_rng(1)
    for _ in range(3000):
        n = int(rng.integers(0, 64))
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        _decode_or_remote_error(data)
        # Random bytes that start like an envelope get further into the decoder.
        _decode_or_remote_error(b"\x83\xa1v\x01\xa1k\xa9heartbeat\xa1b" + data)


def test_fuzz_bit_flips_and_truncations() -> None:
    rng = np.random.default_rng(2)
    for data in _valid_envelopes():
        for _ in range(1000):
            flipped = bytearray(data)
            for _ in range(int(rng.integers(1, 4))):
                bit = int(rng.integers(0, len(data) * 8))
                flipped[bit // 8] ^= 1 << (bit % 8)
            _decode_or_remote_error(bytes(flipped))
        for cut in range(len(data)):
            with pytest.raises(RemoteProtocolError):
                decode_envelope(data[:cut])


def test_fuzz_frame_streams() -> None:
    rng = np.random.default_rng(3)
    stream = b"".join(frame(e) for e in _valid_envelopes())
    for _ in range(2000):
        mutated = bytearray(stream[: int(rng.integers(0, len(stream) + 1))])
        if mutated and rng.random() < 0.7:
            bit = int(rng.integers(0, len(mutated) * 8))
            mutated[bit // 8] ^= 1 << (bit % 8)
        dec = FrameDecoder(max_frame=4096)
        try:
            pos = 0
            while pos < len(mutated):
                n = int(rng.integers(1, 64))
                dec.feed(bytes(mutated[pos : pos + n]))
                pos += n
                while (payload := dec.next_frame()) is not None:
                    _decode_or_remote_error(payload)
            dec.at_eof()
        except RemoteProtocolError:
            pass


# --- typed messages ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Heartbeat(nonce=0),
        Heartbeat(nonce=2**64 - 1),
        HeartbeatAck(nonce=42),
        StatusRequest(),
        StatusResponse(records=()),
        StatusResponse(records=(b"\x82" * 4096,) * MAX_STATUS_RECORDS),
        ErrorMessage(code="too_busy", message="retry in 5 s ✓"),
    ],
)
def test_message_round_trip(message: Message) -> None:
    data = encode_message(message)
    assert decode_message(decode_frame(frame(data))) == message


def decode_frame(stream: bytes) -> bytes:
    dec = FrameDecoder()
    dec.feed(stream)
    payload = dec.next_frame()
    assert payload is not None
    dec.at_eof()
    return payload


@pytest.mark.parametrize(
    ("kind", "body", "match"),
    [
        ("heartbeat", {}, "body keys"),
        ("heartbeat", {"nonce": 1, "x": 2}, "body keys"),
        ("heartbeat", {"nonce": -1}, "invalid heartbeat: nonce"),
        ("heartbeat", {"nonce": True}, "invalid heartbeat: nonce"),
        ("heartbeat_ack", {"nonce": "1"}, "invalid heartbeat_ack"),
        ("status_request", {"x": 1}, "body keys"),
        ("status_response", {"records": {}}, "invalid status_response"),
        ("status_response", {"records": ["text"]}, "invalid status_response"),
        ("status_response", {"records": [b"x" * 4097]}, "invalid status_response"),
        ("status_response", {"records": [b""] * 1001}, "invalid status_response"),
        ("error", {"code": "", "message": ""}, "invalid error"),
        ("error", {"code": "Bad\x1b", "message": ""}, "invalid error"),
        ("error", {"code": "x", "message": "m" * 1025}, "invalid error"),
    ],
)
def test_decode_message_rejects(kind: str, body: dict[str, Any], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_message(raw_envelope({"v": 1, "k": kind, "b": body}))


def test_decode_message_kind_without_type(kinds: dict[str, int]) -> None:
    register_kind("future_kind", 100)
    with pytest.raises(RemoteProtocolError, match="no message type"):
        decode_message(encode_envelope("future_kind", {}))


def test_message_construction_is_checked_locally() -> None:
    with pytest.raises(LocalProtocolError):
        Heartbeat(nonce=2**64)
    with pytest.raises(LocalProtocolError):
        StatusResponse(records=[b"x"])  # type: ignore[arg-type]


def test_fuzz_messages() -> None:
    rng = np.random.default_rng(4)
    valid = [
        encode_message(m)
        for m in (Heartbeat(nonce=7), StatusResponse(records=(b"r" * 30,)), ErrorMessage("x", "y"))
    ]
    for data in valid:
        for _ in range(500):
            flipped = bytearray(data)
            bit = int(rng.integers(0, len(data) * 8))
            flipped[bit // 8] ^= 1 << (bit % 8)
            with contextlib.suppress(RemoteProtocolError):
                decode_message(bytes(flipped))
