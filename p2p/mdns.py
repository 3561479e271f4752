"""mDNS: find peers on the same LAN with no bootstrap at all (cars in one garage, phones on one Wi-Fi).

The libp2p mDNS spec (https://github.com/libp2p/specs/blob/master/discovery/mdns.md), through
py-libp2p 0.8.1's implementation (``libp2p.discovery.mdns``, built on ``zeroconf``): each node
registers a service ``<random 63 chars>._p2p._udp.local.`` whose TXT record carries its
multiaddrs as ``dnsaddr=/ip4/.../tcp/.../p2p/<peer id>`` and browses for the others'.

How we wrap it (``run_mdns``):

- zeroconf runs its own threads; creating, registering and closing it block, so they run in a
  worker thread under a deadline. Its browser calls back in its own thread: we do not use the
  library's process-wide ``peerDiscovery`` callbacks (every host of a process would hear every
  discovery) but poll the listener's table from trio every ``poll_s``.
- ``MDNSDiscovery.start()`` spawns a trio *system* task nobody owns (its stale-entry cleanup);
  we register the service ourselves and run the cleanup in our own nursery instead.
- A wildcard listen address (``0.0.0.0``) is advertised as each non-loopback IPv4 address of the
  machine (the library would advertise ``0.0.0.0``, which a peer would dial as itself).
- What a LAN peer announces is untrusted: at most ``max_peers`` are tracked, each address must
  parse as a multiaddr, and each peer is reported to ``on_peer`` at most once per
  ``redial_s``; the caller connects with its own deadlines and verifies everything it is sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import multiaddr
import trio

if TYPE_CHECKING:
    from .host import Host

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2p._udp.local."  # the spec's service name (py-libp2p's SERVICE_TYPE)

#: Called with a discovered peer's full multiaddrs (each ending in /p2p/<peer id>).
PeerCallback = Callable[[str, list[str]], None]


def advertised_addrs(listen_addrs: list[str]) -> list[str]:
    """``listen_addrs`` with a wildcard IPv4 address replaced by each non-loopback IPv4 address."""
    out: list[str] = []
    for addr in listen_addrs:
        if addr.startswith("/ip4/0.0.0.0/"):
            rest = addr.removeprefix("/ip4/0.0.0.0")
            out += [f"/ip4/{ip}{rest}" for ip in _local_ipv4()]
        else:
            out.append(addr)
    return list(dict.fromkeys(out))


def _local_ipv4() -> list[str]:
    import ifaddr  # zeroconf's own dependency

    return [str(ip.ip) for adapter in ifaddr.get_adapters() for ip in adapter.ips
            if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]


async def run_mdns(host: Host, on_peer: PeerCallback, *, poll_s: float = 0.5, redial_s: float = 30.0,
                   max_peers: int = 64, ttl_s: int = 120, op_timeout_s: float = 10.0,
                   task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Announce ``host`` on the LAN and report peers found there until cancelled.

    Raises OSError (after logging) if mDNS cannot start at all (no multicast-capable interface).
    On cancellation the service is unregistered (a goodbye packet) within ``op_timeout_s``.
    """
    from libp2p.discovery.mdns.mdns import MDNSDiscovery

    lhost = host._host
    addrs = advertised_addrs(host.multiaddrs())
    port = int(multiaddr.Multiaddr(addrs[0]).value_for_protocol("tcp")) if addrs else 0

    def _start() -> Any:
        mdns = MDNSDiscovery(lhost.get_network(), port=port, listen_addrs=addrs,
                             service_type=SERVICE_TYPE, ttl=ttl_s)
        mdns.broadcaster.register()
        return mdns

    with trio.fail_after(op_timeout_s):
        mdns = await trio.to_thread.run_sync(_start, abandon_on_cancel=True)  # type: ignore[call-arg]
    log.info("mDNS: announcing %s on the LAN", ", ".join(addrs) or "nothing")
    reported: dict[str, float] = {}  # peer id -> when it was last handed to on_peer
    try:
        task_status.started()
        next_cleanup = time.monotonic() + ttl_s
        while True:
            await trio.sleep(poll_s)
            now = time.monotonic()
            try:  # the zeroconf thread adds entries meanwhile: copy, retry next poll if it moved
                found = list(mdns.listener.discovered_services.values())
            except RuntimeError:
                continue
            for peer, _seen_at in found[:max_peers]:
                pid = peer.to_base58()
                if pid == host.peer_id or now - reported.get(pid, -redial_s) < redial_s:
                    continue
                try:
                    peer_addrs = list(dict.fromkeys(
                        f"{str(a).split('/p2p/')[0]}/p2p/{pid}" for a in lhost.get_peerstore().addrs(peer)[:8]
                        if "/p2p-circuit" not in str(a)))
                except Exception as e:  # not (or no longer) in the peerstore
                    log.debug("mDNS peer %s: %r", pid[-8:], e)
                    continue
                if not peer_addrs:
                    continue
                (log.debug if pid in reported else log.info)("mDNS: found %s at %s", pid, peer_addrs)
                reported[pid] = now
                if len(reported) > 4 * max_peers:
                    for old in sorted(reported, key=reported.__getitem__)[:max_peers]:
                        del reported[old]
                on_peer(pid, peer_addrs)
            if now >= next_cleanup:
                next_cleanup = now + ttl_s
                mdns.listener.cleanup_stale_entries(max_age=2 * ttl_s)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(op_timeout_s):
            await trio.to_thread.run_sync(_stop_quietly, mdns, abandon_on_cancel=True)  # type: ignore[call-arg]


def _stop_quietly(mdns: Any) -> None:
    try:
        mdns.broadcaster.unregister()
        mdns.listener.stop()
        mdns.zeroconf.close()
    except Exception as e:  # shutting down: nothing left to protect
        log.debug("mDNS stop: %r", e)
