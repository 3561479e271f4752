"""Wire-level conformance: a real node driven only with the bytes docs/PROTOCOL.md describes.

Nothing here goes through the project's codec (``idlefleet.protocols``): frames, envelopes,
records and tensors are built and parsed by hand with plain ``msgpack``, ``struct``, ``base58``
and ``cryptography``, the way an implementation written from the document would. libp2p itself
(TCP, Noise, Yamux, GossipSub) is the transport both sides share; the streams are raw libp2p
streams, not our framed wrapper.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import base58
import msgpack
import numpy as np
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from idlefleet.node.config import NodeConfig
from idlefleet.node.runtime.node import Node, open_node
from idlefleet.p2p.host import Host, HostConfig, open_host

RECORD_DOMAIN = b"idlefleet/capacity-record/v1\x00"
RECORD_FIELDS = (  # section 3.2, in order
    "peer_id", "public_key", "addrs", "region", "state", "battery_soc", "plugged_in", "charging_kw",
    "thermal_headroom_c", "parked_since", "expected_departure", "consent", "consent_expires",
    "link_kind", "link_metered", "compute_gflops", "free_memory_mb", "load", "model_id", "blocks",
    "seq", "issued_at", "expires_at",
)
HEARTBEAT = "/idlefleet/heartbeat/1.0.0"
STATUS = "/idlefleet/status/1.0.0"
STAGE = "/idlefleet/stage/1.0.0"
TOPIC = "/idlefleet/v1/capacity/u33d"  # section 4, the default region


# --- the document's encodings, by hand -------------------------------------------------------------

def peer_id_of(pub: bytes) -> str:  # section 1.1
    return base58.b58encode(bytes.fromhex("002408011220") + pub).decode()


def envelope(kind: str, body: dict[str, Any]) -> bytes:  # section 2.3
    return msgpack.packb({"v": 1, "k": kind, "b": body}, use_bin_type=True)


def frame(payload: bytes) -> bytes:  # section 2.1
    return struct.pack(">I", len(payload)) + payload


def parse_envelope(payload: bytes) -> tuple[str, dict[str, Any]]:
    env = msgpack.unpackb(payload, raw=False)
    assert set(env) == {"v", "k", "b"} and env["v"] == 1 and isinstance(env["b"], dict)
    return env["k"], env["b"]


def verify_record(raw: bytes) -> dict[str, Any]:  # section 3.1 / 3.4 steps 2-10
    outer = msgpack.unpackb(raw, raw=False)
    assert set(outer) == {"body", "sig"} and len(outer["sig"]) == 64 and len(raw) <= 4096
    fields = msgpack.unpackb(outer["body"], raw=False)
    assert fields["v"] == 1
    public_key = Ed25519PublicKey.from_public_bytes(fields["public_key"])
    public_key.verify(outer["sig"], RECORD_DOMAIN + outer["body"])  # raises InvalidSignature
    assert fields["peer_id"] == peer_id_of(fields["public_key"])
    # The reference encoder's order; the optional policy fields (§3.2) only when not default.
    assert list(fields) in (["v", *RECORD_FIELDS], ["v", *RECORD_FIELDS, "policy", "policy_reason"])
    return fields


def sign_record(key: Ed25519PrivateKey, **fields: Any) -> bytes:  # section 3.3
    body = msgpack.packb({"v": 1, **{name: fields[name] for name in RECORD_FIELDS}}, use_bin_type=True)
    return msgpack.packb({"body": body, "sig": key.sign(RECORD_DOMAIN + body)}, use_bin_type=True)


def f32_tensor(x: np.ndarray, **extra: Any) -> dict[str, Any]:  # section 6.3
    return {"dtype": "float32", "shape": list(x.shape), "data": x.astype("<f4").tobytes(), **extra}


# --- a raw libp2p stream ---------------------------------------------------------------------------

class RawStream:
    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def send(self, kind: str, body: dict[str, Any]) -> None:
        with trio.fail_after(5):
            await self.stream.write(frame(envelope(kind, body)))

    async def send_bytes(self, data: bytes) -> None:
        with trio.fail_after(5):
            await self.stream.write(data)

    async def _exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = await self.stream.read(n - len(buf))
            except StreamEOF:
                chunk = b""
            if not chunk:
                raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    async def receive(self, timeout: float = 10) -> tuple[str, dict[str, Any]]:
        with trio.fail_after(timeout):
            (length,) = struct.unpack(">I", await self._exactly(4))
            return parse_envelope(await self._exactly(length))


@asynccontextmanager
async def raw_stream(host: Host, peer: str, protocol: str) -> AsyncIterator[RawStream]:
    with trio.fail_after(5):
        stream = await host._host.new_stream(ID.from_base58(peer), [TProtocol(protocol)])
    try:
        yield RawStream(stream)
    finally:
        with trio.move_on_after(2):
            await stream.close()


@asynccontextmanager
async def serving_node(tmp_path: Path, host_key: Ed25519PrivateKey | None = None, *,
                       serve: bool = True) -> AsyncIterator[tuple[Node, Host]]:
    """A real node (hosting the first blocks that fit 40 MB when ``serve``) and a bare libp2p host
    connected to it."""
    config = NodeConfig(key_file=tmp_path / "node.key", vehicle="sim:parked:seed=1", consent=True,
                        serve=serve, memory_budget_mb=40, event_log=tmp_path / "events.jsonl")
    async with (
        open_node(config) as node,
        open_host(host_key or Ed25519PrivateKey.generate(), HostConfig()) as host,
    ):
        await host.connect(node.multiaddrs[0])
        with trio.fail_after(30):
            while serve and (node.view.get(node.peer_id) is None
                             or node.view.get(node.peer_id).record.blocks is None):
                await trio.sleep(0.1)
        yield node, host


def documented_protocols() -> set[str]:
    """The protocol ids of the table in docs/PROTOCOL.md section 1.2."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    table = doc.split("A node serves exactly these stream protocols:", 1)[1].split("\n\n", 2)[1]
    ids = set()
    for row in table.splitlines()[2:]:
        ids.update(re.findall(r"`(/[^`]+)`", row.split("|")[1]))
    return ids


async def identify_protocols(host: Host, peer: str) -> set[str]:
    """The ``protocols`` of a libp2p identify reply (one uvarint-length-prefixed protobuf)."""
    from libp2p.identity.identify.pb.identify_pb2 import Identify

    async with raw_stream(host, peer, "/ipfs/id/1.0.0") as s:
        data = b""
        with trio.fail_after(5):
            try:
                while chunk := await s.stream.read(65536):
                    data += chunk
            except StreamEOF:
                pass
    length, shift, i = 0, 0, 0
    while True:
        length |= (data[i] & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if data[i - 1] < 0x80:
            break
    message = Identify()
    message.ParseFromString(data[i:i + length])
    return set(message.protocols)


async def status_records(host: Host, peer: str) -> dict[str, dict[str, Any]]:
    async with raw_stream(host, peer, STATUS) as s:
        await s.send("status_request", {})
        kind, body = await s.receive()
    assert kind == "status_response" and set(body) == {"records"}
    records = [verify_record(raw) for raw in body["records"]]
    return {r["peer_id"]: r for r in records}


# --- the protocols ---------------------------------------------------------------------------------

async def test_heartbeat_status_and_gossip_by_hand(tmp_path: Path) -> None:
    host_key = Ed25519PrivateKey.generate()
    async with serving_node(tmp_path, host_key) as (node, host):
        # §1.2: exactly the documented protocols, as the node's identify reply lists them.
        protocols = await identify_protocols(host, node.peer_id)
        assert protocols == documented_protocols()

        # §6.1: heartbeat_ack echoes the nonce; §6: further requests on the same stream are served.
        async with raw_stream(host, node.peer_id, HEARTBEAT) as s:
            for nonce in (0, 2**64 - 1):
                await s.send("heartbeat", {"nonce": nonce})
                assert await s.receive() == ("heartbeat_ack", {"nonce": nonce})
            await s.send("status_request", {})  # the wrong kind for this protocol
            kind, body = await s.receive()
            assert kind == "error" and body["code"] == "bad_request"

        # §6.2: the status reply holds the node's own record, verifiable by hand.
        records = await status_records(host, node.peer_id)
        mine = records[node.peer_id]
        assert mine["region"] == "u33d" and mine["state"] in ("joining", "online")
        assert mine["model_id"].startswith("gguf-sha256:") and mine["blocks"] is not None

        # §4: the test host's own record, signed by hand and published on the region's topic,
        # enters the node's view; someone else's record published by the test host does not.
        await host.subscribe(TOPIC, lambda origin, data: True)
        with trio.fail_after(10):
            while node.peer_id not in host.gossip_peers(TOPIC):
                await trio.sleep(0.1)
        await trio.sleep(2.0)  # GossipSub heartbeats: the node grafts us into its mesh
        other = Ed25519PrivateKey.generate()
        await host.publish(TOPIC, envelope("capacity", {"record": hand_record(other)}))
        await host.publish(TOPIC, envelope("capacity", {"record": hand_record(host_key)}))
        with trio.fail_after(10):
            while host.peer_id not in await status_records(host, node.peer_id):
                await trio.sleep(0.2)
        stranger = peer_id_of(other.public_key().public_bytes_raw())
        assert stranger not in await status_records(host, node.peer_id)
        assert node.rejected["source_mismatch"] == 1


def hand_record(key: Ed25519PrivateKey) -> bytes:
    pub = key.public_key().public_bytes_raw()
    now = time.time()
    return sign_record(
        key, peer_id=peer_id_of(pub), public_key=pub, addrs=[], region="u33d", state="online",
        battery_soc=0.5, plugged_in=True, charging_kw=7.0, thermal_headroom_c=20.0,
        parked_since=now - 60, expected_departure=None, consent=True, consent_expires=None,
        link_kind="wifi", link_metered=False, compute_gflops=10.0, free_memory_mb=1024, load=0.0,
        model_id="", blocks=None, seq=int(now * 1000), issued_at=now, expires_at=now + 60)


async def test_stage_session_by_hand(tmp_path: Path, model_file: Any) -> None:
    from idlefleet.node.model.stage import load_stage

    async with serving_node(tmp_path) as (node, host):
        mine = (await status_records(host, node.peer_id))[node.peer_id]
        model_id, (start, end) = mine["model_id"], mine["blocks"]
        opening = {"model_id": model_id, "start": start, "end": end, "max_length": 8, "dtype": "float32"}
        x = np.random.default_rng(0).standard_normal((2, 576)).astype(np.float32)
        async with raw_stream(host, node.peer_id, STAGE) as s:
            # An error that leaves the session "not opened" keeps the stream usable (§6.3).
            await s.send("session_open", opening | {"model_id": "gguf-sha256:" + "0" * 64})
            kind, body = await s.receive()
            assert (kind, body["code"]) == ("error", "wrong_model")
            await s.send("session_open", opening | {"end": end + 1})
            kind, body = await s.receive()
            assert (kind, body["code"]) == ("error", "wrong_blocks")
            await s.send("session_open", opening)
            kind, body = await s.receive()
            assert kind == "session_opened"
            assert body["start"] == start and body["end"] == end and body["hidden"] == 576
            session = body["session"]

            # "scales" MUST be absent for float32; a step past the cache is bad_position. Both
            # leave the session as it was.
            await s.send("step", {"position": 0, "hidden": f32_tensor(x, scales=b"\0" * 8)})
            assert (await s.receive())[1]["code"] == "bad_tensor"
            await s.send("step", {"position": 3, "hidden": f32_tensor(x)})
            assert (await s.receive())[1]["code"] == "bad_position"

            await s.send("step", {"position": 0, "hidden": f32_tensor(x)})
            kind, body = await s.receive()
            assert kind == "step_result" and set(body) == {"position", "hidden", "draining", "sig"}
            assert body["position"] == 0 and body["draining"] is False
            out = body["hidden"]
            # §6.3 / §7.2: "sig" is the server's signature over the step commitment, rebuilt here
            # from what was sent and received.
            def rows_root(t: dict[str, Any]) -> bytes:  # §7.1, float32
                width = t["shape"][1] * 4
                prefix = b"idlefleet/row/v1\x00float32\x00"
                digests = [hashlib.sha256(prefix + t["data"][i * width:(i + 1) * width]).digest()
                           for i in range(t["shape"][0])]
                return hashlib.sha256(b"idlefleet/rows/v1\x00" + b"".join(digests)).digest()
            commitment = msgpack.packb({
                "v": 1, "server": node.peer_id, "client": host.peer_id, "model_id": model_id, "start": start,
                "end": end, "session": session, "position": 0, "tokens": 2,
                "input_root": rows_root(f32_tensor(x)), "output_root": rows_root(out)}, use_bin_type=True)
            Ed25519PublicKey.from_public_bytes(mine["public_key"]).verify(
                body["sig"], b"idlefleet/step-commitment/v1\x00" + commitment)  # raises InvalidSignature
            assert set(out) == {"dtype", "shape", "data"} and out["dtype"] == "float32"
            assert out["shape"] == [2, 576] and len(out["data"]) == 2 * 576 * 4
            got = np.frombuffer(out["data"], dtype="<f4").reshape(2, 576)
            stage = load_stage(model_file, start, end)
            want = stage.forward(x, stage.new_cache(), 0)
            assert all(math.isfinite(v) for v in got.ravel()[:16])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

            await s.send("session_close", {})
            assert await s.receive() == ("session_closed", {})


async def test_oversized_header_is_refused_at_once(tmp_path: Path) -> None:
    # §2.1 and §2.4: a header announcing more than the stream's largest kind (256 bytes for
    # heartbeat and status requests) is refused at the header, long before any deadline.
    async with serving_node(tmp_path, serve=False) as (node, host):
        for protocol in (HEARTBEAT, STATUS):
            async with raw_stream(host, node.peer_id, protocol) as s:
                await s.send_bytes(struct.pack(">I", 1000))
                with trio.fail_after(1):
                    try:
                        kind, body = await s.receive(timeout=1)
                        assert (kind, body["code"]) == ("error", "bad_request")
                    except EOFError:
                        pass  # dropping the stream at once is as good
