"""Server-to-server chaining: the relay streams between stage servers (``RELAY_PROTOCOL``).

A chained step (``protocols.session``, docs/PROTOCOL.md 5.4) travels client -> A -> B -> C ->
client: each server computes its blocks and forwards a ``relay_step`` to the next hop's server.
One stream per (upstream, downstream) pair of peers carries relayed steps for any number of
sessions, one way only: the receiver never answers on it (a failure goes to the session's client,
as ``chain_failed``, on that session's own stream). ``RelayLinks`` is the sending side (one stream
per next-hop peer, opened on first use, re-opened once when it died); ``serve_relay`` the
receiving side, which hands each relayed step to the stage server holding its session. A relayed
step proves its right to feed a session with the session's relay token, which only the session's
client (from ``session_opened``) and the hop it handed it to know.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
import trio.lowlevel

from idlefleet.node.serve.server import StageServer
from idlefleet.p2p.errors import DeadlineExceeded, NetworkError, StreamClosed
from idlefleet.p2p.framing import FramedStream
from idlefleet.protocols import session as S
from idlefleet.protocols.errors import RemoteProtocolError

log = logging.getLogger(__name__)

RELAY_IDLE_S = 120.0  # an incoming relay stream with no frame this long is closed
RELAY_SEND_S = 2.0  # connecting and opening the stream to the next hop, and sending one step
RELAY_MAX_INFLIGHT = 32  # relayed steps of one incoming stream served at once (they batch)
RELAY_MAX_DROPPED = 16  # relayed steps for no session here, in a row, before we hang up
RELAY_MAX_OUT = 64  # outgoing relay streams kept open (one per next-hop peer)
RELAY_REUSE_S = RELAY_IDLE_S / 2  # an outgoing stream silent this long is replaced, not reused
RELAY_GATHER_TICKS = 2  # scheduler passes a sender waits for more steps to the same peer
RELAY_BATCH_BYTES = 1 << 20  # a relay_steps frame carries about this much at most (more: next frame)


def _approx_bytes(body: dict[str, Any]) -> int:
    """About what a relay_step body takes on the wire: its tensors plus a little per entry."""
    trail = body.get("trail") or []
    return 256 + 128 * len(body.get("chain") or []) + sum(
        160 + len(e["hidden"].get("data", b"")) + len(e["hidden"].get("scales") or b"") for e in trail)


class _Outgoing:
    """One relayed step waiting to go: its body, and once sent (or not) whether it failed."""

    __slots__ = ("body", "done", "error")

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.done = False
        self.error: str | None = None


class RelayLinks:
    """Our relay streams to next-hop peers. ``addrs_of(peer)`` gives addresses to dial a peer we
    are not connected to (the fleet view).

    Steps computed in one batch go on together: a step for a peer whose stream is busy, or that
    arrives within the same few scheduler ticks as others for that peer, joins them in one
    ``relay_steps`` frame (protocol 1.1.0; one ``relay_step`` frame each to a 1.0.0 peer). A lone
    step waits for nobody: at most ``RELAY_GATHER_TICKS`` checkpoints, no timer."""

    def __init__(self, host: Any, addrs_of: Callable[[str], list[str]]) -> None:
        self._host = host
        self._addrs_of = addrs_of
        self._out: dict[str, FramedStream] = {}
        self._used: dict[str, float] = {}  # peer -> when its stream last carried a step (trio clock)
        self._locks: dict[str, trio.Lock] = {}
        self._queues: dict[str, list[_Outgoing]] = {}  # peer -> steps waiting for its stream
        self.frames = 0  # frames sent (a relay_steps frame counts once)
        self.steps = 0  # relayed steps sent

    async def send(self, peer: str, body: dict[str, Any]) -> None:
        """Send one ``relay_step`` body to ``peer`` within ``RELAY_SEND_S`` per attempt (two at
        most: a cached stream may have died), together with any others for ``peer`` queued
        meanwhile. Raises NetworkError."""
        if len(self._locks) > 4 * RELAY_MAX_OUT:  # a client naming many peers grows nothing for long
            for p in [p for p, lk in self._locks.items()
                      if p not in self._out and not lk.locked() and not self._queues.get(p)]:
                del self._locks[p]
                self._queues.pop(p, None)
        item = _Outgoing(body)
        queue = self._queues.setdefault(peer, [])
        queue.append(item)
        lock = self._locks.setdefault(peer, trio.Lock())
        try:
            async with lock:
                if not item.done:  # nobody took it along: we send, and take along whoever queued
                    await self._flush(peer, queue)
        finally:
            if not item.done and item in queue:  # cancelled before it went: it does not go
                queue.remove(item)
        if item.error is not None:
            raise NetworkError(item.error)

    async def _flush(self, peer: str, queue: list[_Outgoing]) -> None:
        for _ in range(RELAY_GATHER_TICKS):  # the rest of a batch just computed is on its way here
            waiting = len(queue)
            await trio.lowlevel.checkpoint()
            if len(queue) == waiting:
                break
        batch: list[_Outgoing] = []
        size = 0
        for it in queue[:S.RELAY_BATCH_MAX]:  # a frame well within any receiver's frame limit
            size += _approx_bytes(it.body)
            if batch and size > RELAY_BATCH_BYTES:
                break
            batch.append(it)
        del queue[:len(batch)]
        error: str | None = "cancelled"
        try:
            await self._write(peer, [it.body for it in batch])
            error = None
        except NetworkError as e:
            error = str(e)
        finally:
            for it in batch:
                it.done, it.error = True, error

    async def _write(self, peer: str, bodies: list[dict[str, Any]]) -> None:
        now = trio.current_time()
        stale = self._out.get(peer)
        if stale is not None and now - self._used.get(peer, now) >= RELAY_REUSE_S:
            # The receiver hangs up after RELAY_IDLE_S of silence; a step written into a
            # stream it is closing would be lost (the client would wait for it): start afresh.
            del self._out[peer]
            await stale.reset()
        self._used[peer] = now
        for attempt in (0, 1):
            fs = self._out.get(peer)
            try:
                if fs is None:
                    fs = await self._open(peer)
                if len(bodies) == 1:
                    await fs.send("relay_step", bodies[0], timeout=RELAY_SEND_S)
                    self.frames += 1
                elif fs.protocol == S.RELAY_PROTOCOL:
                    await fs.send("relay_steps", {"steps": bodies}, timeout=RELAY_SEND_S)
                    self.frames += 1
                else:  # a 1.0.0 peer: one frame each
                    for body in bodies:
                        await fs.send("relay_step", body, timeout=RELAY_SEND_S)
                        self.frames += 1
                self.steps += len(bodies)
                return
            except NetworkError:
                self._out.pop(peer, None)
                if fs is not None:
                    await fs.reset()
                if attempt:
                    raise

    async def _open(self, peer: str) -> FramedStream:
        if peer not in self._host.connected_peers():
            addrs = self._addrs_of(peer)
            if not addrs:
                raise NetworkError(f"{peer[-8:]} is not in the fleet view")
            await self._host.connect_peer(peer, addrs, timeout=RELAY_SEND_S)
        fs: FramedStream = await self._host.open_stream(peer, (S.RELAY_PROTOCOL, S.RELAY_PROTOCOL_1_0),
                                                        timeout=RELAY_SEND_S)
        if len(self._out) >= RELAY_MAX_OUT:  # the oldest goes (bounded: reset takes at most 1 s)
            oldest = next(iter(self._out))
            self._used.pop(oldest, None)
            await self._out.pop(oldest).reset()
        self._out[peer] = fs
        return fs

    async def aclose(self) -> None:
        for fs in list(self._out.values()):
            await fs.reset()
        self._out.clear()


async def serve_relay(fs: FramedStream, find: Callable[[int], StageServer | None],
                      on_drop: Callable[[str], None]) -> None:
    """Serve relayed steps from the hop before us, each on the server ``find(session)`` that
    holds its session. Steps are served concurrently (so they batch with other sessions' steps),
    at most ``RELAY_MAX_INFLIGHT`` at once; nothing is sent back on ``fs``. A step dropped without
    a word (malformed, unknown session or token, stale) is counted by ``on_drop(reason)``;
    ``RELAY_MAX_DROPPED`` malformed or unknown ones in a row end the stream, as does a bad frame.
    On protocol 1.1.0 a ``relay_steps`` frame carries several steps, each counted as above."""
    slots = trio.Semaphore(RELAY_MAX_INFLIGHT)  # released by the task serving the step
    kinds = ("relay_step",) if fs.protocol == S.RELAY_PROTOCOL_1_0 else ("relay_step", "relay_steps")
    dropped = 0

    async def serve(server: StageServer, rs: S.RelayStep) -> None:
        try:
            why = await server.relay_step(rs)
            if why is not None:
                on_drop(why)
        except RemoteProtocolError as e:  # the relayed input was bad: that session's problem only
            on_drop("bad input")
            log.info("relayed step for session %d: %s", rs.session, e)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        while dropped < RELAY_MAX_DROPPED:
            try:
                env = await fs.receive(timeout=RELAY_IDLE_S)
                if env.kind not in kinds:
                    raise RemoteProtocolError(f"expected {' or '.join(kinds)}, got {env.kind}")
                bodies = S.relay_bodies(env.kind, env.body)
            except (StreamClosed, DeadlineExceeded, NetworkError, RemoteProtocolError) as e:
                log.debug("relay stream from %s ends: %s", fs.peer_id[-8:], e)
                break
            for body in bodies:
                try:
                    rs = S.RelayStep.from_body(body)
                except RemoteProtocolError as e:
                    dropped += 1
                    on_drop("malformed")
                    log.info("relay_step from %s: %s", fs.peer_id[-8:], e)
                    continue
                server = find(rs.session)
                if server is None:
                    dropped += 1
                    on_drop("unknown session or relay token")
                    continue
                dropped = 0
                await slots.acquire()
                nursery.start_soon(serve, server, rs)
        if dropped >= RELAY_MAX_DROPPED:
            log.info("relay stream from %s: %d relayed steps in a row for no session here; closed",
                     fs.peer_id[-8:], dropped)
    await fs.reset()
