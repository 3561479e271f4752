"""The status protocol: a peer asks for this node's fleet view and gets the signed records.

Server side: ``status_handler(view)`` answers ``status_request`` with the live records of ``view``
(peers this node verified first). Client side: ``request_status`` (over a running host) and
``fetch_status`` (a throwaway identity, for ``idlefleet status``). Records travel as their signed
bytes: the asker verifies each one itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.protocols import wire
from idlefleet.protocols.errors import ConfigError, RecordRejected, RemoteProtocolError
from idlefleet.protocols.fleet import FleetView
from idlefleet.protocols.messages import (
    MAX_STATUS_RECORDS,
    StatusRequest,
    StatusResponse,
    message_from_envelope,
)
from idlefleet.protocols.records import record_to_dict, validate_record

log = logging.getLogger(__name__)

STATUS_PROTOCOL = "/idlefleet/status/1.0.0"

StatusHandler = Callable[[str, wire.Envelope], Awaitable[tuple[str, dict[str, Any]]]]


def status_handler(view: FleetView) -> StatusHandler:
    """The request handler of ``STATUS_PROTOCOL`` for ``host.set_request_handler``: replies with up
    to ``MAX_STATUS_RECORDS`` live records of ``view``. A request that is not an empty
    ``status_request`` raises RemoteProtocolError (the host answers the peer with an error)."""

    async def handle(peer_id: str, env: wire.Envelope) -> tuple[str, dict[str, Any]]:
        message_from_envelope(env)  # a status_request has an empty body; anything else is refused
        # Live peers seen alive by this node first: strangers' records cannot crowd them out.
        raws = tuple(e.raw for e in view.preferred(time.time(), MAX_STATUS_RECORDS))
        reply = StatusResponse(raws)
        return reply.KIND, reply.to_body()

    return handle


async def request_status(host: Host, peer: str, *, timeout: float) -> StatusResponse:
    """Ask ``peer`` for its fleet view (records unverified: check each with validate_record).
    Raises NetworkError, or RemoteProtocolError for a malformed reply."""
    request = StatusRequest()
    env = await host.request(peer, STATUS_PROTOCOL, request.KIND, request.to_body(), timeout=timeout)
    reply = message_from_envelope(env)
    if not isinstance(reply, StatusResponse):
        raise RemoteProtocolError(f"expected status_response, got {env.kind}")
    return reply


async def fetch_status(bootstrap: str, *, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Ask the node at ``bootstrap`` for its fleet view; verify every record ourselves.

    Uses a throwaway identity. Returns JSON-friendly dicts sorted by peer id. Raises ConfigError
    for an address that is not a peer multiaddr, NetworkError if the node cannot be asked.
    """
    if "/p2p/" not in bootstrap or not bootstrap.startswith("/"):
        raise ConfigError(f"{bootstrap!r} is not a peer multiaddr like /ip4/1.2.3.4/tcp/4001/p2p/12D3KooW...")
    key = Ed25519PrivateKey.generate()
    async with open_host(key, HostConfig()) as host:
        deadline = trio.current_time() + timeout
        peer = await host.connect(bootstrap, timeout=timeout)
        status = await request_status(host, peer, timeout=max(0.1, deadline - trio.current_time()))
    now = time.time()
    out = []
    for raw in status.records:
        try:
            out.append(record_to_dict(validate_record(raw, now)))
        except RecordRejected as e:
            log.warning("status: %s sent an invalid record: %s", bootstrap, e)
    return sorted(out, key=lambda d: d["peer_id"])
