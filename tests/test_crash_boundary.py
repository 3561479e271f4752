"""Issue 8 findings: no peer input ends the process, and every door has its limit (in-process).

Each attack is what a hostile peer does: a fresh key, a real libp2p connection, the bytes.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.model.stage import Stage
from idlefleet.node.runtime.node import STATUS_PROTOCOL, capacity_topic, open_node
from idlefleet.node.serve.server import ServerConfig
from idlefleet.p2p.errors import NetworkError, RemoteError
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.guard import Misbehaviour, TokenBuckets
from idlefleet.p2p.host import GOSSIP_PROTOCOLS, Host, HostConfig, open_host
from idlefleet.p2p.liveness import HEARTBEAT_PROTOCOL
from idlefleet.protocols import session as S
from idlefleet.protocols import wire
from idlefleet.protocols.tensors import encode_hidden
from tests.test_node import node_config
from tests.test_stage_server import hidden, open_session, served, two_blocks  # noqa: F401

MESHSUB_KILLER = bytes.fromhex("05ffffffffff")  # varint 5, then a truncated protobuf field


async def raw_stream(client: Host, peer: str, protocol: str) -> Any:
    """A raw py-libp2p stream (no framing) to ``peer`` on ``protocol``."""
    fs = await client.open_stream(peer, protocol)
    return fs._stream


async def read_until_closed(stream: Any, timeout: float) -> bytes:
    out = b""
    with trio.move_on_after(timeout):
        while True:
            try:
                chunk = await stream.read(65536)
            except Exception:
                break
            if not chunk:
                break
            out += chunk
    return out


async def assert_still_serving(client: Host, peer: str) -> None:
    env = await client.request(peer, STATUS_PROTOCOL, "status_request", {}, timeout=5)
    assert env.kind == "status_response"


# --- remote crashes -----------------------------------------------------------------------------


async def test_truncated_protobuf_on_meshsub_does_not_kill_the_node(tmp_path: Path) -> None:
    async with (
        open_node(node_config(tmp_path, 0)) as node,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as attacker,
    ):
        peer = await attacker.connect(node.multiaddrs[0])
        for protocol in [*GOSSIP_PROTOCOLS, GOSSIP_PROTOCOLS[0]]:
            stream = await raw_stream(attacker, peer, protocol)
            await stream.write(MESHSUB_KILLER)
            await read_until_closed(stream, 2.0)  # the node resets the stream
        with trio.fail_after(5):
            while node.host.stats.handler_crashes < 3:
                await trio.sleep(0.05)
        assert node.host.misbehaviour.score(attacker.peer_id) >= 3 * 10
        assert any(r.startswith("crash:/meshsub") for r in node.host.misbehaviour.totals)
        assert attacker.peer_id in node.statistics()["misbehaviour"]["worst"]
        await assert_still_serving(attacker, peer)


async def test_unexpected_exception_in_a_handler_resets_the_stream_and_scores_the_peer() -> None:
    calls = 0

    async def buggy(peer_id: str, env: wire.Envelope) -> tuple[str, dict[str, Any]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("a bug reached by peer input")
        return "heartbeat_ack", {"nonce": env.body["nonce"]}

    async with (
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as server,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as client,
    ):
        server.set_request_handler("/test/buggy/1.0.0", "heartbeat", buggy)
        peer = await client.connect(server.multiaddrs()[0])
        with pytest.raises(NetworkError):
            await client.request(peer, "/test/buggy/1.0.0", "heartbeat", {"nonce": 1}, timeout=3)
        assert server.stats.handler_crashes == 1
        assert server.misbehaviour.score(client.peer_id) == 10
        env = await client.request(peer, "/test/buggy/1.0.0", "heartbeat", {"nonce": 2}, timeout=3)
        assert env.body == {"nonce": 2}


async def test_session_open_with_a_list_dtype_is_a_bad_request(two_blocks: Stage) -> None:  # noqa: F811
    async with served(two_blocks, ServerConfig()) as (server, client, peer):
        for bad in ([], {}, 1, None, b"float32"):
            with pytest.raises(RemoteError) as err:
                await open_session(client, peer, two_blocks, dtype=bad)
            assert err.value.code == S.ERR_BAD_REQUEST
        with pytest.raises(RemoteError, match="unknown field"):
            await open_session(client, peer, two_blocks, extra=1)
        assert server.active_sessions == 0
        await open_session(client, peer, two_blocks)


async def test_int8_step_that_overflows_is_bad_tensor_and_the_session_survives(
        two_blocks: Stage) -> None:  # noqa: F811
    async with served(two_blocks, ServerConfig()) as (_server, client, peer):
        fs = await open_session(client, peer, two_blocks)
        q = np.full((1, 576), 127, np.int8)
        body = {"position": 0, "hidden": {"dtype": "int8", "shape": [1, 576], "data": q.tobytes(),
                                          "scales": np.array([3e38], "<f4").tobytes()}}
        await fs.send("step", body, timeout=5)
        with pytest.raises(RemoteError) as err:
            await fs.receive_reply(timeout=10)
        assert err.value.code == S.ERR_BAD_TENSOR
        x = hidden(2)
        np.testing.assert_array_equal(await step_ok(fs, x), two_blocks.forward(x, two_blocks.new_cache(), 0))


async def step_ok(fs: FramedStream, x: np.ndarray) -> np.ndarray:
    from tests.test_stage_server import step

    return await step(fs, x, 0)


async def test_a_step_whose_output_the_server_cannot_encode_gets_an_error_not_a_crash(
        two_blocks: Stage) -> None:  # noqa: F811
    async with served(two_blocks, ServerConfig()) as (_server, client, peer):
        fs = await open_session(client, peer, two_blocks, dtype="float16")
        huge = np.full((1, 576), 1e6, np.float32)  # a valid float32 step; its output exceeds float16
        await fs.send("step", S.Step(0, encode_hidden(huge)).to_body(), timeout=5)
        with pytest.raises(RemoteError) as err:
            await fs.receive_reply(timeout=10)
        assert err.value.code == S.ERR_BAD_TENSOR
        x = hidden(1)
        await fs.send("step", S.Step(0, encode_hidden(x)).to_body(), timeout=5)
        reply = await fs.receive_reply(timeout=10)  # the session survived
        assert reply.kind == "step_result"


# --- limits at the door ------------------------------------------------------------------------


async def test_small_kinds_refuse_a_big_frame_header_at_once(tmp_path: Path) -> None:
    async with (
        open_node(node_config(tmp_path, 0)) as node,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as attacker,
    ):
        peer = await attacker.connect(node.multiaddrs[0])
        for protocol, kind in ((STATUS_PROTOCOL, "status_request"), (HEARTBEAT_PROTOCOL, "heartbeat")):
            assert wire.KINDS[kind] == 256
            stream = await raw_stream(attacker, peer, protocol)
            await stream.write(struct.pack(">I", 257))  # the header alone, no payload ever follows
            with trio.fail_after(2.0):  # well under the 5 s request deadline: no waiting for bytes
                reply = await read_until_closed(stream, 2.0)
            env = wire.decode_envelope(reply[4:])
            assert env.kind == "error" and "limit 256" in env.body["message"], protocol
        await assert_still_serving(attacker, peer)


async def test_inbound_streams_per_peer_are_capped() -> None:
    async def echo(peer_id: str, env: wire.Envelope) -> tuple[str, dict[str, Any]]:
        return "heartbeat_ack", {"nonce": env.body["nonce"]}

    async with (
        open_host(Ed25519PrivateKey.generate(), HostConfig(max_inbound_streams_per_peer=8)) as server,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as client,
    ):
        server.set_request_handler("/test/echo/1.0.0", "heartbeat", echo)
        peer = await client.connect(server.multiaddrs()[0])
        held: list[FramedStream] = []
        for _ in range(12):  # the client's pubsub and identify streams count too
            try:
                held.append(await client.open_stream(peer, "/test/echo/1.0.0", timeout=3))
            except NetworkError:
                break
        assert 0 < len(held) < 8
        assert server._boundary.inbound_streams(client.peer_id) == 8
        assert server.stats.streams_refused >= 1
        for fs in held:
            await fs.aclose()
        with trio.fail_after(5):
            while server._boundary.inbound_streams(client.peer_id) >= 8:  # pubsub's stream stays
                await trio.sleep(0.02)
        env = await client.request(peer, "/test/echo/1.0.0", "heartbeat", {"nonce": 2}, timeout=3)
        assert env.body == {"nonce": 2}


class _AnyValue:
    def validate(self, key: str, value: bytes) -> None:
        pass

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


async def test_dht_stores_only_validated_namespaces_and_a_bounded_count(tmp_path: Path) -> None:
    ok = _AnyValue()
    async with (
        open_host(Ed25519PrivateKey.generate(), HostConfig(dht_max_values=5)) as server,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as attacker,
    ):
        server.register_dht_namespace("t", ok.validate, ok.select)
        for ns in ("t", "junk"):  # the attacker's own node accepts anything it is asked to put
            attacker.register_dht_namespace(ns, ok.validate, ok.select)
        await attacker.connect(server.multiaddrs()[0])
        for i in range(3):  # 1 MB values under a namespace the server never registered
            await attacker.dht_put(f"/junk/{i}", b"x" * 1_000_000, timeout=10)
        assert server.dht_store_sizes()[0] == 0
        for i in range(12):
            await attacker.dht_put(f"/t/{i}", b"v%d" % i, timeout=10)
        assert server.dht_store_sizes()[0] == 5
        assert server.stats.dht_refused >= 7


# --- gossip budget and aggregated logging -------------------------------------------------------


def publish_rpc(topic: str, origin: bytes, datas: list[bytes], first_seqno: int) -> bytes:
    """A varint-prefixed GossipSub RPC publishing ``datas`` (unsigned: garbage for the node)."""
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.utils.varint import encode_uvarint

    rpc = rpc_pb2.RPC()
    for i, data in enumerate(datas):
        msg = rpc.publish.add()
        msg.from_id, msg.data, msg.seqno = origin, data, (first_seqno + i).to_bytes(8, "big")
        msg.topicIDs.append(topic)
    body = rpc.SerializeToString()
    return bytes(encode_uvarint(len(body))) + body


async def test_a_gossip_flood_costs_a_bounded_number_of_checks_and_no_line_per_message(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with (
        open_node(node_config(tmp_path, 0)) as node,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as attacker,
    ):
        topic = capacity_topic(node.config.region)
        peer = await attacker.connect(node.multiaddrs[0])
        stream = await raw_stream(attacker, peer, GOSSIP_PROTOCOLS[0])
        origin = Ed25519PrivateKey.generate()
        from libp2p.peer.id import ID

        from idlefleet.p2p.identity import libp2p_key_pair

        origin_id = ID.from_pubkey(libp2p_key_pair(origin).public_key).to_bytes()
        flood = 2000
        for batch in range(flood // 100):
            await stream.write(publish_rpc(topic, origin_id, [b"\xc1garbage"] * 100, batch * 100))
        with trio.fail_after(20):
            while node.host.stats.gossip_checked + node.host.stats.gossip_rate_limited < flood:
                await trio.sleep(0.05)
        burst = HostConfig().gossip_origin_burst
        # One origin through one sender: the burst, plus what refilled at 5/s meanwhile.
        assert node.host.stats.gossip_checked <= burst + 5 * 20
        assert node.host.stats.gossip_rate_limited >= flood - burst - 5 * 20
        # No line per message: rejections are summed up in one line per interval (not yet due).
        assert [r for r in caplog.records if "dropped gossip" in r.getMessage()
                or "rejected peer input" in r.getMessage()] == []
        line = node.host.misbehaviour.summary()
        assert line is not None and f"gossip_rate_limited={node.host.stats.gossip_rate_limited}" in line
        await assert_still_serving(attacker, node.peer_id)


def test_misbehaviour_summary_is_one_line_per_interval_and_scores_are_bounded() -> None:
    m = Misbehaviour(max_peers=10)
    for i in range(1000):
        m.note(f"peer{i % 10}", "malformed" if i % 2 else "rate", penalty=1, detail=f"msg {i}")
    for i in range(10, 15):  # five more peers push the five least recently seen out
        m.note(f"peer{i}", "rate", penalty=0)
    line = m.summary()
    assert line is not None and "\n" not in line
    assert "malformed=500" in line and "rate=505" in line
    assert m.summary() is None  # counts are per interval
    assert m.totals == {"malformed": 500, "rate": 505}
    assert len(m.statistics()["worst"]) <= 5
    assert m.score("peer9") == 100 and m.score("peer14") == 0
    assert m.score("peer0") == 0 and m.conduct("peer0") is None  # only the 10 most recent kept
    assert m.statistics()["peers_tracked"] == 10


def test_token_buckets_refill_at_their_rate_and_stay_bounded() -> None:
    now = [0.0]
    b = TokenBuckets(rate=2.0, burst=3, max_keys=4, clock=lambda: now[0])
    assert [b.take("a") for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5
    assert b.take("a") and not b.take("a")
    assert b.take("b")
    for k in range(10):
        b.take(k)
    assert len(b) == 4


def test_int8_decode_rejects_values_that_overflow_float32() -> None:
    from idlefleet.protocols.errors import TensorError
    from idlefleet.protocols.tensors import EncodedTensor, TensorLimits, decode_hidden

    q = np.array([[127, -127, 1]], np.int8)
    t = EncodedTensor("int8", (1, 3), q.tobytes(), np.array([3e38], "<f4").tobytes())
    with pytest.raises(TensorError, match="NaN or inf"):
        decode_hidden(t, TensorLimits())
    ok = EncodedTensor("int8", (1, 3), q.tobytes(), np.array([1e36], "<f4").tobytes())
    assert np.isfinite(decode_hidden(ok, TensorLimits())).all()
