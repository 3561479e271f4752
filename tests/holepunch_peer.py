"""One libp2p host with the NAT service, for the hole punching test (tests/test_nat.py); run inside
a network namespace: ``python -m tests.holepunch_peer ROLE LISTEN_IP STATUS_FILE [ARGS]``.

- ``relay``: serves relay slots; status: its address and the bytes it has relayed.
- ``car ADDR``: connects to the relay at ADDR, reserves a slot; status: its relayed address.
- ``client ADDR PEER CIRCUIT``: connects to the relay at ADDR, then to PEER through CIRCUIT, and
  sends it a request every 0.2 s; status: its connections to PEER (remote addresses), replies,
  and ``direct_after_s`` (seconds from the relayed connection to having only direct ones).

Every role writes its status (JSON, replaced atomically) every 0.2 s and exits by itself after
``LIFETIME_S`` (or when the test terminates it)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.p2p.nat import Nat, NatConfig

LIFETIME_S = 120.0
PORT = 4001
ECHO = "/test/echo/1"


async def _echo(peer_id: str, env: Any) -> tuple[str, dict[str, Any]]:
    return "heartbeat_ack", {"nonce": env.body["nonce"]}


def _conns(host: Host, peer_id: str) -> list[str]:
    """Remote address of each connection to ``peer_id`` (a circuit address for a relayed one)."""
    from libp2p.peer.id import ID

    out = []
    for conn in host._host.get_network().connections.get(ID.from_base58(peer_id), []):
        addrs = [str(a) for a in conn.get_transport_addresses()]
        out.append(addrs[0] if addrs else "?")
    return out


async def main(role: str, ip: str, status_file: Path, args: list[str]) -> None:
    config = NatConfig(autonat=False, first_check_s=600, hole_punch_s=0.5, relay_close_s=1.0,
                       hole_punch_timeout_s=12.0)
    status: dict[str, Any] = {"role": role}

    def write() -> None:
        tmp = status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, status_file)

    with trio.move_on_after(LIFETIME_S):
        async with open_host(Ed25519PrivateKey.generate(), HostConfig(listen_host=ip, port=PORT)) as host, \
                trio.open_nursery() as nursery:
            relay = args[0] if args else None
            nat = Nat(host, config, lambda: [relay.split("/p2p/")[1]] if relay else [], lambda: None)
            await nursery.start(nat.run)
            host.set_request_handler(ECHO, "heartbeat", _echo)
            status.update(peer_id=host.peer_id, addr=host.multiaddrs()[0])
            if relay is not None:
                await host.connect(relay, timeout=10)
            if role == "car":
                with trio.fail_after(20):
                    while not await nat.ensure_reservation():
                        await trio.sleep(0.5)
            replies = 0
            if role == "client":
                peer, circuit = args[1], args[2]
                await host.connect_peer(peer, [circuit], timeout=10)
                status["first_conns"] = _conns(host, peer)
                relayed_at = trio.current_time()
            while True:
                if role == "client":
                    try:
                        await host.request(peer, ECHO, "heartbeat", {"nonce": replies}, timeout=2)
                        replies += 1
                    except Exception as e:  # reported, the test decides
                        status["last_error"] = repr(e)[:300]
                    status.update(conns=_conns(host, peer), replies=replies)
                    direct = not any("/p2p-circuit" in a for a in status["conns"])
                    if direct and "direct_after_s" not in status:
                        status["direct_after_s"] = round(trio.current_time() - relayed_at, 2)
                status.update(nat=nat.statistics())
                write()
                await trio.sleep(0.2)


if __name__ == "__main__":
    if os.environ.get("LIBP2P_DEBUG"):  # py-libp2p's own logs too (p2p/host.py), in ROLE.log
        logging.basicConfig(level=logging.DEBUG)
    trio.run(main, sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
