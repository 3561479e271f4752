"""Liveness: our own heartbeats, SWIM indirect probes and hard eviction.

py-libp2p never notices a frozen peer (SIGSTOP: streams hang 40 s+, ``disconnect`` hangs), and a
SIGKILLed peer only shows up as a closed connection. So every ``interval_s`` we send each connected
peer a heartbeat request with a deadline. After ``misses`` consecutive failures the peer is only
*suspect*: we ask up to ``indirect`` other peers to heartbeat it for us (``/idlefleet/probe/1.0.0``,
SWIM's ping-req) and evict it hard and report it dead only if none of them got an answer either.
A disconnect that an immediate re-probe cannot repair (connection refused) is dead at once.

A busy event loop must not look like a dead peer: the heartbeat loop measures its own lateness, and
a failure of a heartbeat that was in flight while this process was stalled (``stall_s``) does not
count as a miss; and a suspect that itself sent us a heartbeat within the last ``misses * timeout_s``
is slow, not frozen (a frozen process sends nothing), so it is not evicted.

``check(peer)`` is the same test on demand (direct and indirect probes at once), used to verify a
peer-down notice before believing it. Round-trip times are kept (EWMA, minimum) for route choice.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import trio

from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.membership import ProbeRequest, ProbeResult
from idlefleet.protocols.messages import Heartbeat, HeartbeatAck, message_from_envelope
from idlefleet.protocols.wire import Envelope

from .errors import NetworkError
from .host import Host

log = logging.getLogger(__name__)

HEARTBEAT_PROTOCOL = "/idlefleet/heartbeat/1.0.0"
PROBE_PROTOCOL = "/idlefleet/probe/1.0.0"


@dataclass(frozen=True)
class LivenessConfig:
    interval_s: float = 1.0
    # A node computing at full CPU answers late, and a false eviction costs a lot (connections torn
    # down, notices, refutations): two consecutive 2 s deadlines, then the indirect probes must
    # fail too. A frozen peer goes within interval + misses * timeout + indirect_timeout <= 7 s.
    timeout_s: float = 2.0
    misses: int = 2
    indirect: int = 2  # peers asked to probe a suspect for us
    indirect_timeout_s: float = 2.0  # our deadline for their answer (they probe with 3/4 of it)
    max_probes_served: int = 8  # indirect probes we run for others at once
    stall_s: float = 0.5  # the heartbeat loop this late means this process was stalled
    rtt_alpha: float = 0.3  # EWMA weight of a new RTT sample


class Liveness:
    """Heartbeats every connected peer; evicts and reports the dead. Start with ``nursery.start(run)``."""

    def __init__(self, host: Host, on_dead: Callable[[str, str], None],
                 config: LivenessConfig = LivenessConfig(),
                 on_alive: Callable[[str], None] | None = None) -> None:
        self._host = host
        self._on_dead = on_dead
        self._on_alive = on_alive
        self._config = config
        self._probes_served = 0
        self._stalled_at = -float("inf")  # when the heartbeat loop last woke up late
        self._heard_at: dict[str, float] = {}  # peer -> when it last sent us a heartbeat
        self._misses: dict[str, int] = {}
        self._probing: set[str] = set()
        self._reprobe: set[str] = set()  # disconnected while a probe was in flight: probe again after it
        self._evicted: dict[str, float] = {}  # peer -> monotonic time we evicted it
        self.rtt_s: dict[str, float] = {}  # EWMA of heartbeat round trips
        self.min_rtt_s: dict[str, float] = {}  # lowest round trip seen
        self.dead_reported = 0
        self.indirect_saves = 0  # suspects that an indirect probe showed alive
        self.slow_saves = 0  # suspects that were heartbeating us themselves
        host.set_request_handler(HEARTBEAT_PROTOCOL, "heartbeat", self._handle)
        host.set_request_handler(PROBE_PROTOCOL, ProbeRequest.KIND, self._handle_probe)
        host.on_disconnect(self._disconnected)
        self._nursery: trio.Nursery | None = None

    async def _handle(self, peer_id: str, env: Envelope) -> tuple[str, dict[str, Any]]:
        beat = message_from_envelope(env)  # RemoteProtocolError for a bad body
        assert isinstance(beat, Heartbeat)  # the host checked the kind
        if peer_id in self._heard_at or len(self._heard_at) < 4096:
            self._heard_at[peer_id] = trio.current_time()
        ack = HeartbeatAck(beat.nonce)
        return ack.KIND, ack.to_body()

    async def _handle_probe(self, peer_id: str, env: Envelope) -> tuple[str, dict[str, Any]]:
        """Heartbeat ``target`` on a peer's behalf, if we are connected to it (we dial nobody for
        a stranger). At most ``max_probes_served`` at once; beyond that the answer is "no ack"."""
        request = ProbeRequest.from_body(env.body)  # RemoteProtocolError for a bad body
        alive = False
        if (request.target in self._host.connected_peers() and request.target != peer_id
                and self._probes_served < self._config.max_probes_served):
            self._probes_served += 1
            try:
                alive = await self._heartbeat(request.target, 0.75 * self._config.indirect_timeout_s)
            finally:
                self._probes_served -= 1
        result = ProbeResult(request.nonce, alive)
        return result.KIND, result.to_body()
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    for peer in sorted(self._host.connected_peers()):
                        self._start_probe(peer, after_disconnect=False)
                    woke = trio.current_time() + self._config.interval_s
                    await trio.sleep(self._config.interval_s)
                    if trio.current_time() - woke > self._config.stall_s:
                        self._stalled_at = trio.current_time()
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

    async def _heartbeat(self, peer_id: str, timeout: float) -> bool:
        """One heartbeat round trip within ``timeout``; records the RTT. False on any failure."""
        return await self._beat(peer_id, timeout) is None

    async def _beat(self, peer_id: str, timeout: float) -> str | None:
        """One heartbeat round trip within ``timeout``; records the RTT. None, or what failed."""
        started = trio.current_time()
        beat = Heartbeat(secrets.randbits(63))
        try:
            reply = await self._host.request(peer_id, HEARTBEAT_PROTOCOL, beat.KIND, beat.to_body(),
                                             timeout=timeout, reuse=True)
            if message_from_envelope(reply) != HeartbeatAck(beat.nonce):
                raise RemoteProtocolError(f"bad heartbeat reply {reply.kind}")
        except (NetworkError, RemoteProtocolError) as e:
            return str(e)
        rtt = trio.current_time() - started
        old = self.rtt_s.get(peer_id)
        a = self._config.rtt_alpha
        self.rtt_s[peer_id] = rtt if old is None else (1 - a) * old + a * rtt
        # The minimum filters out queueing in busy processes on either end: the path's own delay.
        self.min_rtt_s[peer_id] = min(rtt, self.min_rtt_s.get(peer_id, rtt))
        if self._on_alive is not None:
            self._on_alive(peer_id)
        return None

    async def _probe(self, peer_id: str, after_disconnect: bool) -> None:
        try:
            while True:
                started = trio.current_time()
                error = await self._beat(peer_id, self._config.timeout_s)
                if error is None:
                    self._misses.pop(peer_id, None)
                    return
                if not after_disconnect and self._stalled_at >= started:
                    return  # we were stalled while it was in flight: no evidence against the peer
                misses = self._misses.get(peer_id, 0) + 1
                self._misses[peer_id] = misses
                if after_disconnect or misses >= self._config.misses:
                    break
                # A suspect is heartbeated again at once after a timeout (not at the next tick), but
                # never more often than every interval.
                await trio.sleep_until(started + self._config.interval_s)
                if peer_id not in self._host.connected_peers():
                    return
            why = f"{'disconnected, ' if after_disconnect else ''}{misses} missed heartbeat(s): {error}"
            if not after_disconnect and self._heard_recently(peer_id):
                log.info("peer %s is slow (%s) but heartbeats us: not dead", peer_id[-8:], why)
                self.slow_saves += 1
                self._misses.pop(peer_id, None)
                return
            if not after_disconnect:
                if await self._indirect(peer_id, exclude=()):
                    log.info("peer %s suspected (%s) but answered an indirect probe", peer_id[-8:], why)
                    self.indirect_saves += 1
                    self._misses.pop(peer_id, None)
                    return
                why += f"; no ack through {min(self._config.indirect, len(self._helpers(peer_id, ())))}" \
                       " indirect probe(s)"
            if peer_id in self._host.connected_peers() or after_disconnect:
                self._declare_dead(peer_id, why)
        finally:
            self._probing.discard(peer_id)
            if peer_id in self._reprobe:
                self._reprobe.discard(peer_id)
                self._disconnected(peer_id)

    def _heard_recently(self, peer_id: str) -> bool:
        heard = self._heard_at.get(peer_id)
        window = self._config.misses * self._config.timeout_s
        return heard is not None and trio.current_time() - heard < window

    def _helpers(self, target: str, exclude: Collection[str]) -> list[str]:
        """Connected peers that answered us (have an RTT) and may probe ``target`` for us."""
        return [p for p in sorted(self._host.connected_peers())
                if p != target and p not in exclude and p in self.rtt_s]

    async def _indirect(self, target: str, *, exclude: Collection[str]) -> bool:
        """Ask up to ``indirect`` random helpers to heartbeat ``target``. True on the first ack."""
        helpers = self._helpers(target, exclude)
        chosen = random.sample(helpers, min(self._config.indirect, len(helpers)))
        return await self._first_true([(self._ask, helper, target) for helper in chosen])

    async def _ask(self, helper: str, target: str) -> bool:
        request = ProbeRequest(secrets.randbits(63), target)
        try:
            reply = await self._host.request(helper, PROBE_PROTOCOL, request.KIND, request.to_body(),
                                             timeout=self._config.indirect_timeout_s)
            if reply.kind != ProbeResult.KIND:
                raise RemoteProtocolError(f"expected probe_result, got {reply.kind}")
            result = ProbeResult.from_body(reply.body)
        except (NetworkError, RemoteProtocolError) as e:
            log.debug("indirect probe of %s through %s failed: %s", target[-8:], helper[-8:], e)
            return False
        return result.nonce == request.nonce and result.alive

    @staticmethod
    async def _first_true(calls: list[tuple[Any, ...]]) -> bool:
        """Run ``calls`` (``(async_fn, *args)``) at once; True as soon as one returns True."""
        found = False
        async with trio.open_nursery() as nursery:
            async def run(fn: Any, *args: Any) -> None:
                nonlocal found
                if await fn(*args):
                    found = True
                    nursery.cancel_scope.cancel()
            for call in calls:
                nursery.start_soon(run, *call)
        return found

    async def check(self, peer_id: str, *, exclude: Collection[str] = ()) -> bool | None:
        """Is ``peer_id`` alive? A direct heartbeat (if connected) and indirect probes through up to
        ``indirect`` other peers (never through ``exclude``), all at once. True on the first ack;
        False if every probe failed (a connected peer is then evicted and reported dead); None if
        there was nobody to ask (not connected, no helpers)."""
        if self._heard_recently(peer_id):
            return True
        calls: list[tuple[Any, ...]] = []
        connected = peer_id in self._host.connected_peers()
        if connected:
            calls.append((self._heartbeat, peer_id, self._config.timeout_s))
        helpers = self._helpers(peer_id, exclude)
        for helper in random.sample(helpers, min(self._config.indirect, len(helpers))):
            calls.append((self._ask, helper, peer_id))
        if not calls:
            return None
        if await self._first_true(calls):
            return True
        if connected and peer_id in self._host.connected_peers():
            self._declare_dead(peer_id, f"failed a check: no ack directly or via {len(calls) - 1} peer(s)")
        return False

    def _declare_dead(self, peer_id: str, reason: str) -> None:
        log.info("peer %s is dead: %s", peer_id[-8:], reason)
        self._misses.pop(peer_id, None)
        self._heard_at.pop(peer_id, None)
        self.rtt_s.pop(peer_id, None)
        self.min_rtt_s.pop(peer_id, None)
        self.dead_reported += 1
        self._evicted[peer_id] = trio.current_time()
        self._host.evict(peer_id)
        self._on_dead(peer_id, reason)
