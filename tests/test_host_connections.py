"""Host connection bookkeeping around py-libp2p 0.8.1's swarm."""

from __future__ import annotations

import numpy as np
import trio
from libp2p.peer.id import ID

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
