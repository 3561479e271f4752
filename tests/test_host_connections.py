"""Host connection bookkeeping around py-libp2p 0.8.1's swarm."""

from __future__ import annotations

import numpy as np
import pytest
import trio
from libp2p.peer.id import ID

from idlefleet.p2p.errors import PeerUnreachable
from idlefleet.protocols import session as S
from idlefleet.protocols.tensors import encode_hidden
from tests.factories import ECHO, echo_hosts


async def test_a_closed_connection_still_listed_is_dialled_again_not_an_error() -> None:
    """py-libp2p can keep a closed connection in its table (seen under load after a cancelled
    job); its new_stream then fails with "No valid connections available" instead of dialling.
    The host forgets such connections: the peer counts as not connected, and opening a stream
    dials it again."""
    async with echo_hosts() as (client, peer):
        swarm = client._host.get_network()
        pid = ID.from_base58(peer)
        (conn,) = swarm.connections[pid]
        await conn.close()
        swarm.connections[pid] = [conn]  # the stale listing: closed, still in the table
        assert conn.is_closed and peer not in client.connected_peers()
        with trio.fail_after(10):
            fs = await client.open_stream(peer, ECHO)
            body = S.Step(7, encode_hidden(np.ones((1, 8), np.float32))).to_body()
            await fs.send("step", body, timeout=5)
            assert (await fs.receive(timeout=5)).body == body
        assert peer in client.connected_peers()
        assert all(not c.is_closed for c in swarm.connections[pid])


async def test_a_connection_whose_muxer_opens_no_stream_is_replaced_by_a_fresh_dial() -> None:
    """Seen in CI: a connection py-libp2p lists as open, but every stream on it fails ("Failed
    to create stream to peer"); the client then banned the only host of its blocks. The host
    closes such a connection and dials once more, within the same deadline."""
    async with echo_hosts() as (client, peer):
        swarm = client._host.get_network()
        pid = ID.from_base58(peer)
        (conn,) = swarm.connections[pid]

        async def dead_muxer() -> None:
            raise RuntimeError("muxer gone")  # what the dead yamux session raised

        conn.new_stream = dead_muxer  # type: ignore[method-assign]
        assert not conn.is_closed  # still listed as a live connection
        with trio.fail_after(10):
            fs = await client.open_stream(peer, ECHO)
            body = S.Step(3, encode_hidden(np.ones((1, 8), np.float32))).to_body()
            await fs.send("step", body, timeout=5)
            assert (await fs.receive(timeout=5)).body == body
        assert conn.is_closed and conn not in swarm.connections.get(pid, [])


async def test_a_refused_protocol_keeps_the_connection() -> None:
    """A peer that does not speak a protocol is not a broken connection: no re-dial."""
    async with echo_hosts() as (client, peer):
        swarm = client._host.get_network()
        (conn,) = swarm.connections[ID.from_base58(peer)]
        with trio.fail_after(10), pytest.raises(PeerUnreachable):
            await client.open_stream(peer, "/not/spoken/1.0.0")
        assert not conn.is_closed and swarm.connections[ID.from_base58(peer)] == [conn]


async def test_a_closed_host_stops_listening_and_a_failed_dial_can_be_forgotten() -> None:
    """A host that exits closes its listeners (py-libp2p serves them from a system task: a closed
    host used to accept and handshake connections until the process ended). py-libp2p refuses
    every dial to a peer whose addresses all failed, for 60 s; a caller
    that decides to try the peer again clears that (``forget_dial_failure``)."""
    import socket

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from idlefleet.p2p.host import HostConfig, open_host

    key = Ed25519PrivateKey.generate()
    async with open_host(Ed25519PrivateKey.generate(), HostConfig()) as me:
        async with open_host(key, HostConfig()) as peer:
            addr, peer_id = peer.multiaddrs()[0], peer.peer_id
        port = int(addr.split("/tcp/")[1].split("/")[0])
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))
        with pytest.raises(PeerUnreachable):  # it is gone
            await me.connect(addr, timeout=5)
        async with open_host(key, HostConfig(port=port)) as back:  # the same peer, the same address
            assert back.multiaddrs()[0] == addr
            with pytest.raises(PeerUnreachable, match="negative cache"):  # remembered: not dialled
                await me.connect(addr, timeout=5)
            me.forget_dial_failure(peer_id)
            assert await me.connect(addr, timeout=5) == peer_id
