"""The DHT as another libp2p implementation sees it (docs/PROTOCOL.md section 5): the protocol id,
record keys, block-provider CIDs, freshness of stored records and replication of provider records.

Requests to nodes are written byte by byte from the standard Kademlia protobuf schema and sent over
``/ipfs/kad/1.0.0`` on a plain libp2p stream, not through ``Host.dht_*``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID

from idlefleet.node.config import NodeConfig
from idlefleet.node.runtime.node import Node
from idlefleet.p2p.host import DHT_PROTOCOL, Host, HostConfig, open_host
from idlefleet.protocols.dhtkeys import (
    block_provider_cid,
    block_provider_cid_bytes,
    block_provider_multihash,
    block_provider_name,
    record_key,
    region_rendezvous_cid,
    region_rendezvous_cid_bytes,
    region_rendezvous_multihash,
    region_rendezvous_name,
)
from idlefleet.protocols.peerid import b58encode
from idlefleet.protocols.records import validate_record
from tests.factories import running_fleet
from tests.test_node import fleet, node_config, wait_converged

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
GET_VALUE, GET_PROVIDERS = 1, 3
MODEL_ID = "gguf-sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def kad_request(kind: int, key: bytes) -> bytes:
    """A Kademlia ``Message{type = kind, key = key}``: field 1 (varint), field 2 (bytes)."""
    return bytes([0x08, kind, 0x12]) + _varint(len(key)) + key


async def plain_kad_query(host: Host, peer_id: str, request: bytes) -> Message:
    """One request/response on a raw ``/ipfs/kad/1.0.0`` stream (unsigned-varint length prefix)."""
    with trio.fail_after(10):
        stream = await host._host.new_stream(ID.from_base58(peer_id), [TProtocol("/ipfs/kad/1.0.0")])
        await stream.write(_varint(len(request)) + request)
        length, shift = 0, 0
        while True:
            byte = (await stream.read(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        data = b""
        while len(data) < length:
            chunk = await stream.read(length - len(data))
            assert chunk, "stream ended inside a reply"
            data += chunk
        await stream.close()
    reply = Message()
    reply.ParseFromString(data)
    return reply


def test_the_dht_speaks_the_standard_kademlia_protocol_id() -> None:
    assert DHT_PROTOCOL == "/ipfs/kad/1.0.0"
    assert "**`/ipfs/kad/1.0.0`**" in PROTOCOL_MD.read_text()


def test_block_provider_cid_matches_the_vector_in_protocol_md() -> None:
    doc = PROTOCOL_MD.read_text()
    section = doc[doc.index("## 5. DHT"):doc.index("## 6.")]
    vector = dict(re.findall(r"^\s*(name|multihash|cid bytes|cid)\s*=\s*(\S+)\s*$", section, re.M))
    model_id, block = vector["name"].removeprefix("idlefleet-blocks/").rsplit("/", 1)
    assert block_provider_name(model_id, int(block)) == vector["name"]
    assert block_provider_multihash(model_id, int(block)).hex() == vector["multihash"]
    assert block_provider_cid_bytes(model_id, int(block)).hex() == vector["cid bytes"]
    assert block_provider_cid(model_id, int(block)) == vector["cid"]


def test_region_rendezvous_cid_matches_the_vector_in_protocol_md() -> None:
    doc = PROTOCOL_MD.read_text()
    section = doc[doc.index("**Region rendezvous"):doc.index("## 6.")]
    vector = dict(re.findall(
        r"^\s*(region name|region multihash|region cid bytes|region cid)\s*=\s*(\S+)\s*$", section, re.M))
    region = vector["region name"].removeprefix("idlefleet-region/")
    assert region_rendezvous_name(region) == vector["region name"]
    assert region_rendezvous_multihash(region).hex() == vector["region multihash"]
    assert region_rendezvous_cid_bytes(region).hex() == vector["region cid bytes"]
    assert region_rendezvous_cid(region) == vector["region cid"]
    for bad in ("", "u33a", "U33D", "u" * 13, "u33d/x"):
        with pytest.raises(ValueError, match="geohash"):
            region_rendezvous_name(bad)


def test_block_provider_cid_is_a_cid_libp2p_parses() -> None:
    from libp2p.bitswap.cid import parse_cid

    cid = parse_cid(block_provider_cid(MODEL_ID, 7))
    assert (cid.version, cid.codec) == (1, "raw")
    assert bytes(cid.multihash) == block_provider_multihash(MODEL_ID, 7)
    assert len(block_provider_multihash(MODEL_ID, 7)) == 34  # py-libp2p ignores provider keys > 80 B
    assert record_key("12D3KooWabc") == "/idlefleet/12D3KooWabc"


async def _wait_fresh_in_dht(reader: Node, node: Node, timeout: float = 30.0) -> int:
    """Wait until ``reader`` fetches ``node``'s latest record from the DHT; returns its seq."""
    with trio.fail_after(timeout):
        while True:
            want = node._seq
            raw = await reader.host.dht_get(record_key(node.peer_id), timeout=10)
            if raw is not None:
                record = validate_record(raw, time.time())
                assert record.peer_id == node.peer_id
                if record.seq >= want:
                    return record.seq
            await trio.sleep(0.5)


async def test_every_live_nodes_record_is_in_the_dht_and_fresh(tmp_path: Path) -> None:
    async with fleet(tmp_path, 4) as nodes:
        await wait_converged(nodes)
        for i, node in enumerate(nodes):  # the bootstrap node (0) included
            await _wait_fresh_in_dht(nodes[(i + 1) % len(nodes)], node)
        # A newer record (here a state change) replaces the stored one, not only the first.
        before = nodes[0]._seq
        await nodes[0].drain(timeout=0.1)
        assert nodes[0]._seq > before
        assert await _wait_fresh_in_dht(nodes[2], nodes[0]) > before
        for node in nodes:
            assert node.discovery.stats["puts"] >= 1 and node.host.dht_routing_table_size() >= 1


async def test_a_plain_kademlia_get_value_returns_a_record_that_verifies(tmp_path: Path) -> None:
    async with fleet(tmp_path, 3) as nodes, open_host(Ed25519PrivateKey.generate(), HostConfig()) as outsider:
        await wait_converged(nodes)
        target, holder = nodes[2], nodes[0]  # the target dialled the holder when it joined
        await _wait_fresh_in_dht(nodes[1], target)
        await outsider.connect(holder.multiaddrs[0])
        request = kad_request(GET_VALUE, record_key(target.peer_id).encode())
        with trio.fail_after(20):  # the target stores each new record at most every 5 s
            while not (reply := await plain_kad_query(outsider, holder.peer_id, request)).HasField("record"):
                await trio.sleep(0.5)
        assert reply.type == GET_VALUE
        record = validate_record(reply.record.value, time.time())
        assert record.peer_id == target.peer_id and record.region == target.config.region


class AnnouncedRange:
    """Stands in for BlockHosting (``node.hosting``): a range announced, nothing loaded. Only the
    DHT provider records of that range matter here."""

    def __init__(self, model_id: str, blocks: tuple[int, int]) -> None:
        self.model_id, self.blocks, self.load, self.ready, self.server = model_id, blocks, 0.0, True, None

    def policy_changed(self, decision: object) -> None:
        pass

    async def drain(self, timeout: float) -> None:
        pass


async def test_provider_records_are_replicated_to_other_peers(tmp_path: Path) -> None:
    async with fleet(tmp_path, 3) as nodes, open_host(Ed25519PrivateKey.generate(), HostConfig()) as finder:
        await wait_converged(nodes)
        provider, holder = nodes[0], nodes[2]
        provider.hosting = AnnouncedRange(MODEL_ID, (4, 6))  # as BlockHosting announces a range
        provider.discovery.blocks_changed()
        with trio.fail_after(30):
            while provider.discovery.stats["provides"] < 2:
                await trio.sleep(0.2)
        # The holder answers a plain GET_PROVIDERS (key = the CID's multihash) with the provider.
        await finder.connect(holder.multiaddrs[0])
        reply = await plain_kad_query(finder, holder.peer_id,
                                      kad_request(GET_PROVIDERS, block_provider_multihash(MODEL_ID, 5)))
        assert reply.type == GET_PROVIDERS
        assert provider.peer_id in {b58encode(p.id) for p in reply.providerPeers}
        # A finder that is not connected to the provider finds it through the DHT.
        assert provider.peer_id not in finder.connected_peers()
        found = await finder.dht_find_providers(block_provider_cid(MODEL_ID, 4), timeout=10)
        assert provider.peer_id in found


async def test_a_region_is_found_by_a_plain_kademlia_provider_lookup(tmp_path: Path) -> None:
    # Nodes willing to serve announce their region (client-only nodes do not); without consent
    # and a data directory they load no blocks.
    def configs(i: int, boot: tuple[str, ...]) -> NodeConfig:
        return node_config(tmp_path, i, boot).replace(serve=True, consent=False)

    async with running_fleet(configs, 3) as nodes, \
            open_host(Ed25519PrivateKey.generate(), HostConfig()) as finder:
        await wait_converged(nodes)
        with trio.fail_after(30):
            while not all(n.discovery.stats["region_provides"] for n in nodes):
                await trio.sleep(0.2)
        # A plain GET_PROVIDERS for the region's multihash, sent to one node, names its peers.
        holder = nodes[0]
        key = region_rendezvous_multihash(holder.config.region)
        with trio.fail_after(20):
            while True:
                # (again each time: nodes evict a peer that does not answer their heartbeats)
                await finder.connect(holder.multiaddrs[0])
                reply = await plain_kad_query(finder, holder.peer_id, kad_request(GET_PROVIDERS, key))
                if {n.peer_id for n in nodes[1:]} <= {b58encode(p.id) for p in reply.providerPeers}:
                    break
                await trio.sleep(0.5)
        # The node's own lookup returns the region's validated records (not its own).
        found = await nodes[1].discovery.find_region_peers(nodes[1].config.region)
        assert {r.peer_id for r in found} == {nodes[0].peer_id, nodes[2].peer_id}
        assert all(r.region == nodes[1].config.region for r in found)
        assert await nodes[1].discovery.find_region_peers("s00") == []
