"""Builders shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.p2p.errors import StreamClosed
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.protocols.peerid import peer_id_from_public_key
from idlefleet.protocols.records import CapacityRecord

T0 = 1_700_000_000.0


def capacity_record(key: Ed25519PrivateKey, *, ttl: float = 60.0, **overrides: Any) -> CapacityRecord:
    """A valid record of ``key``'s peer issued at ``T0`` (or ``issued_at``), with ``overrides``."""
    pub = key.public_key().public_bytes_raw()
    issued = overrides.get("issued_at", T0)
    fields: dict[str, Any] = {
        "peer_id": peer_id_from_public_key(pub), "public_key": pub,
        "addrs": ("/ip4/127.0.0.1/tcp/4001",), "region": "u33d", "state": "online",
        "battery_soc": 0.8, "plugged_in": False, "charging_kw": 0.0, "thermal_headroom_c": 25.0,
        "parked_since": T0 - 3600, "expected_departure": None, "consent": True,
        "consent_expires": None, "link_kind": "wifi", "link_metered": False,
        "compute_gflops": 1000.0, "free_memory_mb": 8192, "load": 0.1, "model_id": "",
        "blocks": None, "seq": 1, "issued_at": issued, "expires_at": issued + ttl,
    }
    fields.update(overrides)
    return CapacityRecord(**fields)


@asynccontextmanager
async def running_fleet(config_of: Callable[[int, tuple[str, ...]], Any], n: int) -> AsyncIterator[list[Any]]:
    """``n`` in-process nodes, ``config_of(i, bootstrap)`` each, all bootstrapped off the first."""
    from idlefleet.node.runtime.node import open_node

    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_node(config_of(0, ())))
        nodes = [first]
        for i in range(1, n):
            nodes.append(await stack.enter_async_context(open_node(config_of(i, (first.multiaddrs[0],)))))
        yield nodes


ECHO = "/test/echo-steps/1.0.0"


async def echo(fs: FramedStream) -> None:
    """Send every message back as it came, until the stream closes."""
    while True:
        try:
            env = await fs.receive(timeout=10)
        except StreamClosed:
            return
        await fs.send(env.kind, env.body, timeout=10)


@asynccontextmanager
async def echo_hosts() -> AsyncIterator[tuple[Host, str]]:
    """Two real hosts on 127.0.0.1, connected; the second echoes on ``ECHO``. Yields the first
    (the client) and the echoing host's peer id."""
    async with (
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as server,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as client,
    ):
        server.set_stream_handler(ECHO, echo)
        yield client, await client.connect(server.multiaddrs()[0])
