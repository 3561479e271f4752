"""In-process fleets of real libp2p nodes on 127.0.0.1: convergence, status, and bad input."""

from __future__ import annotations

import dataclasses
import struct
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.config import NodeConfig
from idlefleet.node.runtime.node import STATUS_PROTOCOL, Node, open_node
from idlefleet.p2p.errors import RemoteError
from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.p2p.identity import peer_id_of, raw_public_key
from idlefleet.protocols import session as S
from idlefleet.protocols import wire
from idlefleet.protocols.records import DOMAIN, CapacityRecord, encode_body
from tests.factories import running_fleet

PROFILES = ("parked", "commuter", "taxi", "laptop", "phone")


def node_config(tmp_path: Path, i: int, bootstrap: tuple[str, ...] = ()) -> NodeConfig:
    return NodeConfig(
        key_file=tmp_path / f"node{i}.key",
        vehicle=f"sim:{PROFILES[i % 5]}:seed={i}",
        bootstrap=bootstrap,
        consent=True,
        serve=False,  # gossip only: these nodes host no model blocks
        event_log=tmp_path / f"node{i}.events.jsonl",
        heartbeat_s=1.0,
        heartbeat_timeout_s=1.0,
    )


def fleet(tmp_path: Path, n: int) -> AbstractAsyncContextManager[list[Node]]:
    return running_fleet(lambda i, boot: node_config(tmp_path, i, boot), n)


async def wait_converged(nodes: list[Node], timeout: float = 20.0) -> None:
    want = {n.peer_id for n in nodes}
    for n in nodes:
        await n.wait_for(lambda f: {r.peer_id for r in f} == want, timeout=timeout)


async def test_key_file_is_the_identity(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, 0)
    async with open_node(cfg) as node:
        first_id = node.peer_id
        assert node.multiaddrs[0].endswith(f"/p2p/{first_id}")
    assert (tmp_path / "node0.key").stat().st_mode & 0o777 == 0o600
    async with open_node(cfg) as node:
        assert node.peer_id == first_id


def forged_record(victim: CapacityRecord, key: Ed25519PrivateKey, *, resign: bool) -> bytes:
    """A record claiming the victim's peer id with our public key: tampered after signing
    (``resign=False``) or validly signed by our key (``resign=True``)."""
    rec = dataclasses.replace(victim, public_key=raw_public_key(key), peer_id=peer_id_of(key))
    body = encode_body(rec).replace(peer_id_of(key).encode(), victim.peer_id.encode())
    sig = key.sign(DOMAIN + (body if resign else encode_body(rec)))
    return wire.pack({"body": body, "sig": sig})


def own_record(key: Ed25519PrivateKey, template: CapacityRecord, **changes: object) -> CapacityRecord:
    fields = {"public_key": raw_public_key(key), "peer_id": peer_id_of(key), **changes}
    return dataclasses.replace(template, **fields)  # type: ignore[arg-type]


async def raw_stream_exchange(host: Host, peer: str, payload: bytes, *, close: bool) -> bytes:
    fs = await host.open_stream(peer, STATUS_PROTOCOL)
    stream = fs._stream
    await stream.write(payload)
    if close:
        await stream.close()
    out = b""
    with trio.move_on_after(5):
        while True:
            try:
                chunk = await stream.read(65536)
            except Exception:
                break
            if not chunk:
                break
            out += chunk
    await fs.reset()
    return out


@pytest.mark.parametrize(
    ("payload", "close", "expect_error"),
    [
        (b"\xff" * 64, False, True),  # garbage length prefix (> max frame)
        (struct.pack(">I", 100) + b"x" * 10, True, False),  # truncated frame, then EOF
        (wire.frame(b"\xc1\xc1\xc1"), False, True),  # a frame that is not msgpack
        (wire.frame(wire.pack({"v": 99, "k": "status_request", "b": {}})), False, True),  # bad version
    ],
)
async def test_garbage_on_streams_gets_an_error_and_the_node_keeps_serving(
    tmp_path: Path, payload: bytes, close: bool, expect_error: bool
) -> None:
    async with (
        open_node(node_config(tmp_path, 0)) as node,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as client,
    ):
        peer = await client.connect(node.multiaddrs[0])
        reply = await raw_stream_exchange(client, peer, payload, close=close)
        if expect_error:
            env = wire.decode_envelope(reply[4:])
            assert env.kind == "error" and env.body["code"] == "bad_request"
        # The node is fine: a proper request still works on the same connection.
        env = await client.request(peer, STATUS_PROTOCOL, "status_request", {})
        assert env.kind == "status_response"
        assert node.host.stats.requests_rejected == 1


async def test_request_of_the_wrong_kind_gets_a_clear_error(tmp_path: Path) -> None:
    async with (
        open_node(node_config(tmp_path, 0)) as node,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as client,
    ):
        peer = await client.connect(node.multiaddrs[0])
        with pytest.raises(RemoteError, match="bad_request"):
            await client.request(peer, STATUS_PROTOCOL, "heartbeat", {"nonce": 1})


async def test_the_lifecycle_drives_the_record_and_the_gate(tmp_path: Path) -> None:
    """``Node.serving`` (protocols/serving.py) is what the record says: a gossip-only node goes
    online, serves no blocks (its gate would refuse), drains on ``drain`` and says goodbye offline."""
    async with open_node(node_config(tmp_path, 0)) as node:
        def mine() -> CapacityRecord:
            entry = node.view.get(node.peer_id)
            assert entry is not None
            return entry.record

        online = lambda f: node.peer_id in {r.peer_id for r in f if r.state == "online"}  # noqa: E731
        await node.wait_for(online, timeout=10)
        assert (node.lifecycle, node.state) == ("running", "online")
        assert node.serving().refusal == (S.ERR_BUSY, "this node serves no blocks")
        await node.drain(timeout=1.0)
        assert node.state == "draining" == mine().state and node.serving().move_on
        await node.drain(timeout=1.0)  # once is enough: no second record
        seq = mine().seq
        assert node.statistics()["seq"] == seq
        await node._goodbye()
        assert mine().state == "offline" and mine().seq > seq
