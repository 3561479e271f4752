"""Liveness: our own heartbeats and hard eviction.

py-libp2p never notices a frozen peer (SIGSTOP: streams hang 40 s+, ``disconnect`` hangs), and a
SIGKILLed peer only shows up as a closed connection. So every ``interval_s`` we send each connected
peer a heartbeat request with a deadline; ``misses`` consecutive failures, or a disconnect that an
immediate re-probe cannot repair, evict the peer hard and report it dead. Round-trip times are kept
(EWMA) for route choice.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.messages import Heartbeat, HeartbeatAck, message_from_envelope
from idlefleet.protocols.wire import Envelope

from .errors import NetworkError
from .host import Host

log = logging.getLogger(__name__)

HEARTBEAT_PROTOCOL = "/idlefleet/heartbeat/1.0.0"


@dataclass(frozen=True)
class LivenessConfig:
    interval_s: float = 2.0
    # Generous: a node computing at full CPU answers late, and a false eviction costs a lot
    # (connections torn down, notices, refutations). Frozen peers still go within ~15 s.
    timeout_s: float = 4.0
    misses: int = 3
    rtt_alpha: float = 0.3  # EWMA weight of a new RTT sample


class Liveness:
    """Heartbeats every connected peer; evicts and reports the dead. Start with ``nursery.start(run)``."""

    def __init__(self, host: Host, on_dead: Callable[[str, str], None],
                 config: LivenessConfig = LivenessConfig()) -> None:
        self._host = host
        self._on_dead = on_dead
        self._config = config
        self._misses: dict[str, int] = {}
        self._probing: set[str] = set()
        self._reprobe: set[str] = set()  # disconnected while a probe was in flight: probe again after it
        self._evicted: dict[str, float] = {}  # peer -> monotonic time we evicted it
        self.rtt_s: dict[str, float] = {}  # EWMA of heartbeat round trips
        self.min_rtt_s: dict[str, float] = {}  # lowest round trip seen
        self.dead_reported = 0
        host.set_request_handler(HEARTBEAT_PROTOCOL, "heartbeat", self._handle)
        host.on_disconnect(self._disconnected)
        self._nursery: trio.Nursery | None = None

    async def _handle(self, peer_id: str, env: Envelope) -> tuple[str, dict[str, Any]]:
        beat = message_from_envelope(env)  # RemoteProtocolError for a bad body
        assert isinstance(beat, Heartbeat)  # the host checked the kind
        ack = HeartbeatAck(beat.nonce)
        return ack.KIND, ack.to_body()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    for peer in sorted(self._host.connected_peers()):
                        self._start_probe(peer, after_disconnect=False)
                    await trio.sleep(self._config.interval_s)
        finally:
            self._nursery = None

    def _start_probe(self, peer_id: str, *, after_disconnect: bool) -> None:
        # Marked as probing before the task starts, so two triggers never probe one peer twice.
        if self._nursery is not None and peer_id not in self._probing:
            self._probing.add(peer_id)
            self._nursery.start_soon(self._probe, peer_id, after_disconnect)

    def _disconnected(self, peer_id: str) -> None:
        # A SIGKILLed peer looks like a closed connection: re-probe at once (the dial is refused).
        evicted = self._evicted.get(peer_id)
        if evicted is not None and trio.current_time() - evicted < 30.0:
            return  # our own eviction closed it; already reported
        if peer_id not in self._probing:
            self._start_probe(peer_id, after_disconnect=True)
        else:
            # The probe in flight may fail as one ordinary miss, and a disconnected peer gets no
            # periodic heartbeats: without a re-probe it would never be declared dead.
            self._reprobe.add(peer_id)

    async def _probe(self, peer_id: str, after_disconnect: bool) -> None:
        try:
            started = trio.current_time()
            beat = Heartbeat(secrets.randbits(63))
            try:
                reply = await self._host.request(peer_id, HEARTBEAT_PROTOCOL, beat.KIND, beat.to_body(),
                                                 timeout=self._config.timeout_s, reuse=True)
                if message_from_envelope(reply) != HeartbeatAck(beat.nonce):
                    raise RemoteProtocolError(f"bad heartbeat reply {reply.kind}")
            except (NetworkError, RemoteProtocolError) as e:
                misses = self._misses.get(peer_id, 0) + 1
                self._misses[peer_id] = misses
                if after_disconnect or misses >= self._config.misses:
                    self._declare_dead(peer_id, f"{'disconnected, ' if after_disconnect else ''}"
                                                f"{misses} missed heartbeat(s): {e}")
                return
            rtt = trio.current_time() - started
            old = self.rtt_s.get(peer_id)
            a = self._config.rtt_alpha
            self.rtt_s[peer_id] = rtt if old is None else (1 - a) * old + a * rtt
            # The minimum filters out queueing in busy processes on either end: the path's own delay.
            self.min_rtt_s[peer_id] = min(rtt, self.min_rtt_s.get(peer_id, rtt))
            self._misses.pop(peer_id, None)
        finally:
            self._probing.discard(peer_id)
            if peer_id in self._reprobe:
                self._reprobe.discard(peer_id)
                self._disconnected(peer_id)

    def _declare_dead(self, peer_id: str, reason: str) -> None:
        log.info("peer %s is dead: %s", peer_id[-8:], reason)
        self._misses.pop(peer_id, None)
        self.rtt_s.pop(peer_id, None)
        self.min_rtt_s.pop(peer_id, None)
        self.dead_reported += 1
        self._evicted[peer_id] = trio.current_time()
        self._host.evict(peer_id)
        self._on_dead(peer_id, reason)
