"""Errors name the side at fault: building a bad message of our own is a LocalProtocolError,
reading the same bad fields from a peer is a RemoteProtocolError with the same reason; the model
engine's refusals are local; a stage server answers a peer's step that would overflow its cache
as that peer's bad step and keeps serving."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.model.kvcache import KVCache
from idlefleet.node.model.stage import Stage
from idlefleet.node.serve.server import ServerConfig, StageServer
from idlefleet.p2p.errors import RemoteError
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.loopback import loopback_pair
from idlefleet.protocols import session as S
from idlefleet.protocols import wire
from idlefleet.protocols.errors import (
    LocalProtocolError,
    LocalTensorError,
    ModelInputError,
    RecordInvalid,
    RecordRejected,
    RemoteProtocolError,
    RemoteTensorError,
    TensorError,
)
from idlefleet.protocols.notices import NOTICE_DOMAIN, PeerDownNotice, decode_notice
from idlefleet.protocols.peerid import peer_id_from_public_key
from idlefleet.protocols.receipts import Receipt, check_proposal, decode_receipt
from idlefleet.protocols.records import DOMAIN, encode_body, encode_signed, validate_record
from idlefleet.protocols.tensors import EncodedTensor, TensorLimits, decode_hidden, encode_hidden
from idlefleet.protocols.verification import StepCommitment
from tests.factories import capacity_record

KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in range(1, 4)]
IDS = [peer_id_from_public_key(k.public_key().public_bytes_raw()) for k in KEYS]
MODEL = "gguf-sha256:" + "ab" * 32
NOW = 1_700_000_100.0
X = encode_hidden(np.ones((1, 4), np.float32))

# -- the same bad fields, built by us and read from a peer -------------------------------------------


def _receipt_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        server=IDS[1], client=IDS[0], model_id=MODEL, start=10, end=20, session=3, opened_at=NOW - 60,
        closed_at=NOW, tokens=100, block_steps=1000, flops=7.1e9, verified=90, unverified=6, rejected=4)
    return fields | changes


def _receipt_from_peer(fields: dict[str, Any]) -> None:
    body = wire.pack({"v": 1, **fields})
    decode_receipt(wire.pack({"body": body, "server_sig": bytes(64), "client_sig": bytes(64)}))


def _commitment_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(server=IDS[1], client=IDS[0], model_id=MODEL, start=10, end=20,
                                  session=7, position=0, tokens=1, input_root=bytes(32),
                                  output_root=bytes(32))
    return fields | changes


def _commitment_from_peer(fields: dict[str, Any]) -> None:
    StepCommitment.decode(wire.pack({"body": wire.pack({"v": 1, **fields}), "sig": bytes(64)}))


def _notice_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(reporter=IDS[0], subject=IDS[1], subject_seq=42, observed_at=NOW,
                                  reason="heartbeats failed")
    return fields | changes


def _notice_from_peer(fields: dict[str, Any]) -> None:
    body = msgpack.packb({"v": 1, **fields}, use_bin_type=True)  # signed by the reporter: only
    sig = KEYS[0].sign(NOTICE_DOMAIN + body)  # the fields are wrong
    decode_notice(msgpack.packb({"body": body, "sig": sig}, use_bin_type=True), NOW)


HOP = {"peer": IDS[1], "session": 7, "relay": bytes(16)}
OPEN = {"model_id": MODEL, "start": 0, "end": 4, "max_length": 64, "dtype": "float32"}
STEP = {"position": 0, "hidden": X.to_dict()}

# (what, build it ourselves, read the same fields from a peer, the reason both name)
CASES: list[tuple[str, Callable[[], object], Callable[[], object], str]] = [
    ("session_open model_id", lambda: S.OpenRequest(**(OPEN | {"model_id": ""})),
     lambda: S.OpenRequest.from_body(OPEN | {"model_id": ""}), "model_id must be a non-empty"),
    ("session_open block range", lambda: S.OpenRequest(**(OPEN | {"start": 4})),
     lambda: S.OpenRequest.from_body(OPEN | {"start": 4}), "bad block range"),
    ("session_open dtype", lambda: S.OpenRequest(**(OPEN | {"dtype": "float64"})),
     lambda: S.OpenRequest.from_body(OPEN | {"dtype": "float64"}), "dtype must be one of"),
    ("chain hop relay token", lambda: S.ChainHop(IDS[1], 7, b"short"),
     lambda: S.ChainHop.from_body(HOP | {"relay": b"short"}), "relay must be 16 bytes"),
    ("step position", lambda: S.Step(-1, X), lambda: S.Step.from_body(STEP | {"position": -1}),
     "position must be a non-negative integer"),
    ("step fence", lambda: S.Step(0, X, fence=-1), lambda: S.Step.from_body(STEP | {"fence": -1}),
     "fence must be an integer"),
    ("chained step seq", lambda: S.Step(0, X, (S.ChainHop(**HOP),)),
     lambda: S.Step.from_body(STEP | {"chain": [HOP]}), "a chained step needs a seq"),
    ("receipt counts", lambda: Receipt(**_receipt_fields(verified=91)),
     lambda: _receipt_from_peer(_receipt_fields(verified=91)), r"verified \+ unverified \+ rejected"),
    ("receipt parties", lambda: Receipt(**_receipt_fields(client=IDS[1])),
     lambda: _receipt_from_peer(_receipt_fields(client=IDS[1])), "server and client must differ"),
    ("receipt peer id", lambda: Receipt(**_receipt_fields(server="not-a-peer")),
     lambda: _receipt_from_peer(_receipt_fields(server="not-a-peer")), "base58"),
    ("commitment tokens", lambda: StepCommitment(**_commitment_fields(tokens=0)),
     lambda: _commitment_from_peer(_commitment_fields(tokens=0)), "tokens >= 1"),
    ("commitment root", lambda: StepCommitment(**_commitment_fields(input_root=b"x")),
     lambda: _commitment_from_peer(_commitment_fields(input_root=b"x")), "input_root must be 32 bytes"),
    ("commitment peer id", lambda: StepCommitment(**_commitment_fields(client="Qm" + "1" * 44)),
     lambda: _commitment_from_peer(_commitment_fields(client="Qm" + "1" * 44)), "peer id"),
    ("notice self report", lambda: PeerDownNotice(**_notice_fields(subject=IDS[0])),
     lambda: _notice_from_peer(_notice_fields(subject=IDS[0])), "cannot report itself"),
    ("notice reason", lambda: PeerDownNotice(**_notice_fields(reason="\x1b[2J")),
     lambda: _notice_from_peer(_notice_fields(reason="\x1b[2J")), "printable ASCII"),
    ("notice observed_at", lambda: PeerDownNotice(**_notice_fields(observed_at=math.nan)),
     lambda: _notice_from_peer(_notice_fields(observed_at=math.nan)), "finite float"),
]


@pytest.mark.parametrize(("what", "build", "decode", "reason"), CASES, ids=[c[0] for c in CASES])
def test_our_bad_message_is_local_and_a_peers_is_remote(
        what: str, build: Callable[[], object], decode: Callable[[], object], reason: str) -> None:
    with pytest.raises(LocalProtocolError, match=reason) as ours:
        build()
    assert not isinstance(ours.value, RemoteProtocolError)
    with pytest.raises(RemoteProtocolError, match=reason) as theirs:
        decode()
    assert not isinstance(theirs.value, LocalProtocolError)


def test_a_peers_bad_receipt_proposal_is_refused_as_theirs() -> None:
    body = wire.pack({"v": 1, **_receipt_fields(verified=91)})
    with pytest.raises(RemoteProtocolError, match="bad_receipt: receipt: verified"):
        check_proposal({"body": body, "client_sig": bytes(64)}, None, NOW)  # type: ignore[arg-type]


def test_tensor_errors_say_whose_tensor_it_is() -> None:
    with pytest.raises(LocalTensorError, match="needs 16 bytes"):
        EncodedTensor("float32", (1, 4), b"short")
    with pytest.raises(LocalTensorError, match="NaN"):
        encode_hidden(np.full((1, 4), np.nan, np.float32))
    with pytest.raises(RemoteTensorError, match="needs 16 bytes") as theirs:
        EncodedTensor.from_dict({"dtype": "float32", "shape": [1, 4], "data": b"short"})
    with pytest.raises(RemoteTensorError, match="hidden size 4 != model hidden size 8"):
        decode_hidden(X, TensorLimits(hidden_size=8))
    # A peer's bad tensor is caught wherever a peer's bad message is; both flavours are a TensorError.
    assert isinstance(theirs.value, RemoteProtocolError)
    assert issubclass(LocalTensorError, TensorError) and issubclass(RemoteTensorError, TensorError)
    assert not issubclass(LocalTensorError, RemoteProtocolError)


def test_a_record_we_build_is_invalid_and_a_peers_is_rejected_with_the_same_reason() -> None:
    record = capacity_record(KEYS[0], issued_at=NOW)
    with pytest.raises(RecordInvalid, match="battery_soc") as ours:
        dataclasses.replace(record, battery_soc=1.5)
    assert ours.value.reason == "out_of_range" and not isinstance(ours.value, RemoteProtocolError)
    # The same field from a peer: a record signed with the bad value in its body.
    body = wire.unpack(encode_body(record), what="test")
    body["battery_soc"] = 1.5
    raw_body = wire.pack(body)
    data = wire.pack({"body": raw_body, "sig": KEYS[0].sign(DOMAIN + raw_body)})
    with pytest.raises(RecordRejected, match="battery_soc") as theirs:
        validate_record(data, NOW)
    assert (theirs.value.reason, theirs.value.detail) == (ours.value.reason, ours.value.detail)
    assert validate_record(encode_signed(record, KEYS[0]), NOW) == record


# -- the model engine's refusals are ours -----------------------------------------------------------


def test_a_kv_cache_overflow_on_our_own_stage_is_a_local_error(whole_model: Stage, head: Any) -> None:
    cache = KVCache(1, 1, 4, max_len=8)
    with pytest.raises(ModelInputError, match="exceeds the context of 8") as err:
        cache.reserve(9)
    assert not isinstance(err.value, RemoteProtocolError)
    cache = whole_model.new_cache()
    cache.max_len = 2
    with pytest.raises(ModelInputError, match="exceeds the context of 2") as err:
        whole_model.forward(head.embed([1, 2, 3]), cache)
    assert not isinstance(err.value, RemoteProtocolError)
    assert cache.length == 0


# -- a peer's step that would overflow the server's cache -----------------------------------------------


class _SmallCacheStage(Stage):
    """A stage whose KV caches hold fewer positions than the model's context (as a memory-starved
    host might): a step the server's own checks pass can still overflow it."""

    def new_cache(self, capacity: int = 64) -> KVCache:
        cache = super().new_cache(capacity)
        cache.max_len = 8
        return cache


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 576)).astype(np.float32)


async def _open(fs: FramedStream, stage: Stage, max_length: int) -> None:
    await fs.send("session_open", S.OpenRequest(stage.model_id, stage.start, stage.end, max_length).to_body(),
                  timeout=5)
    assert (await fs.receive_reply(timeout=5)).kind == "session_opened"


async def _step(fs: FramedStream, x: np.ndarray, position: int) -> np.ndarray:
    await fs.send("step", S.Step(position, encode_hidden(x)).to_body(), timeout=5)
    reply = await fs.receive_reply(timeout=10)
    return decode_hidden(S.StepResult.from_body(reply.body).hidden, TensorLimits())


async def test_a_peers_step_past_its_cache_is_refused_as_theirs(whole_model: Stage) -> None:
    stage = whole_model.sub_stage(0, 2)
    server = StageServer(stage, ServerConfig())
    ours, theirs = loopback_pair(IDS[0])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, theirs)
        await _open(ours, stage, max_length=8)
        await ours.send("step", S.Step(0, encode_hidden(_rows(9))).to_body(), timeout=5)
        with pytest.raises(RemoteError) as err:  # refused before it reaches the stage
            await ours.receive_reply(timeout=5)
        assert err.value.code == S.ERR_BAD_POSITION
        assert server.stats.bad_requests == 1 and server.stats.steps == 0
        x = _rows(3)  # the session survives
        np.testing.assert_array_equal(await _step(ours, x, 0), stage.forward(x, stage.new_cache(), 0))
        await ours.aclose()


async def test_a_stage_refusal_of_a_peers_checked_step_is_their_bad_step(whole_model: Stage) -> None:
    small = _SmallCacheStage(whole_model.model_id, whole_model.config, 0, whole_model.blocks[:2])
    server = StageServer(small, ServerConfig())
    ours, theirs = loopback_pair(IDS[0])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, theirs)
        await _open(ours, small, max_length=64)  # the server's checks allow 64 positions
        await ours.send("step", S.Step(0, encode_hidden(_rows(9))).to_body(), timeout=5)
        with pytest.raises(RemoteError, match="the stage refused the step") as err:
            await ours.receive_reply(timeout=5)
        assert err.value.code == S.ERR_BAD_POSITION
        assert server.stats.bad_requests == 1 and server.stats.steps == 0
        x = _rows(3)  # the session, and the server, survive
        np.testing.assert_array_equal(await _step(ours, x, 0), small.forward(x, small.new_cache(), 0))
        assert server.active_sessions == 1
        await ours.aclose()


async def test_a_signing_server_refuses_a_client_whose_id_it_cannot_name(whole_model: Stage) -> None:
    stage = whole_model.sub_stage(0, 2)
    server = StageServer(stage, ServerConfig(), key=KEYS[2])
    ours, theirs = loopback_pair("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # an RSA libp2p id
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, theirs)
        await ours.send("session_open", S.OpenRequest(stage.model_id, 0, 2, 8).to_body(), timeout=5)
        with pytest.raises(RemoteError, match="not an identity-multihash Ed25519 peer id") as err:
            await ours.receive_reply(timeout=5)
        assert err.value.code == S.ERR_BAD_REQUEST
        assert server.stats.bad_requests == 1 and server.active_sessions == 0
        await ours.aclose()
