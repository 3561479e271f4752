"""The hop sessions of one generation: a chain covering blocks ``[local_blocks, n)``, with failover.

A :class:`Pipeline` routes the blocks (``FleetClient.find_route``), opens one
:class:`~idlefleet.node.client.hop.HopSession` per hop and steps them token by token, hop by hop or
as one chained step (``docs/PROTOCOL.md`` 6.5). When a hop fails (dies, goes silent, refuses,
sends a bad reply) its peer is avoided, only its span is re-routed and the span's past inputs are
replayed to the replacement; a hop whose server drains is moved the same way, without an error. A
rollback (a verdict of the verifier) rewinds the generation and rebuilds the hops of banned peers.
The verifier gets sessions on independent hosts through :class:`VerifierSessions`, not through the
pipeline's own methods. The pipeline's counters are its own (``statistics()``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from idlefleet.node.client.config import GenerationFailed
from idlefleet.node.client.hop import (
    RECEIPT_TIMEOUT_S,
    ChainBroken,
    Exchange,
    HopSession,
    StageFailure,
    State,
)
from idlefleet.node.client.verifier import Verifier
from idlefleet.node.model.generate import Generation
from idlefleet.p2p.errors import NetworkError
from idlefleet.protocols import session as S
from idlefleet.protocols.errors import LocalProtocolError, RemoteProtocolError
from idlefleet.protocols.routing import Hop, NoRoute
from idlefleet.protocols.tensors import EncodedTensor, encode_hidden

if TYPE_CHECKING:
    from idlefleet.node.client.fleet import FleetClient

log = logging.getLogger(__name__)

# Chaining (ClientConfig.chain): how long a chained step's result is waited for before the client
# redoes the step hop by hop: CHAIN_WAIT_FACTOR x the recent chained step time, at least
# CHAIN_MIN_WAIT_S (a hop that died mid-chain costs this, not the full step deadline), and how
# many steps go hop by hop after a chained step failed before chaining is tried again.
CHAIN_MIN_WAIT_S = 1.0
CHAIN_WAIT_FACTOR = 4.0
CHAIN_RETRY_AFTER = 16


@dataclass
class PipelineStatistics:
    steps: int = 0  # forward calls
    chained: int = 0  # steps that went through a chain
    chain_failures: int = 0  # chained steps redone hop by hop
    failovers: int = 0
    bytes_sent: int = 0  # framed bytes of steps to stage servers (verifier sessions included)
    bytes_received: int = 0


def _time_shares(hops: list[Any], ms: list[float]) -> list[float]:
    """How a chained step's time is shared out among its hops (anything with ``start``/``end``),
    for their measured speeds: as the servers say they held it (``ms``, not signed: a hop could
    lie about itself or, relaying, about the others), but each hop's share kept within half and
    twice its share of the blocks."""
    blocks = [h.end - h.start for h in hops]
    fair = [b / sum(blocks) for b in blocks]
    ms = [min(1e9, max(0.0, m)) if math.isfinite(m) else 1e9 for m in ms]
    total = sum(ms)
    claimed = [m / total for m in ms] if total > 0 else fair
    bounded = [min(2 * f, max(0.5 * f, c)) for f, c in zip(fair, claimed, strict=True)]
    return [b / sum(bounded) for b in bounded]


class VerifierSessions:
    """What the verifier may do with the pipeline (``verifier.HopLink``): open a session on an
    independent host of some blocks, and exchange rows on it (counted in the pipeline's bytes)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def open_session(self, peer_id: str, start: int, end: int) -> HopSession:
        """Raises StageFailure (the half-open session is dropped)."""
        hop = HopSession(self._pipeline.client.hop_env, peer_id, start, end)
        try:
            await hop.open(self._pipeline.max_length)
        except StageFailure:
            await hop.abandon()
            raise
        return hop

    async def exchange(self, session: HopSession, rows: np.ndarray, position: int) -> Exchange:
        """Raises StageFailure."""
        return await self._pipeline._exchange(session, rows, position)


class Pipeline:
    """The sessions of one generation: a chain of hops covering blocks ``[0, n)``, with failover."""

    def __init__(self, client: FleetClient, max_length: int, *, strict: bool = False) -> None:
        """Raises LocalProtocolError if our own session request would be invalid (a prompt longer
        than the context, a bad dtype): found before any peer is contacted, blamed on none.
        ``strict``: the verifier checks every session (the generation's tokens wait for it)."""
        self.client = client
        self.max_length = max_length
        self.start = client.model.local_blocks
        self.hops: list[HopSession] = []
        # The route being opened (sessions not all open yet): concurrent generations that route
        # meanwhile follow it as they follow ``hops``.
        self.routing: list[Hop] = []
        context = client.model.head.config.context_length
        if max_length > context:
            raise LocalProtocolError(f"prompt plus max_new_tokens is {max_length} tokens; "
                                     f"the model's context is {context}")
        S.OpenRequest(client.model.model_id, self.start, client.model.n_blocks, max_length,
                      client.config.wire_dtype)  # LocalProtocolError: our own request is invalid
        self._local_cache = client.model.local.new_cache() if client.model.local is not None else None
        self.verifier = (Verifier(client, VerifierSessions(self), max_length, strict=strict)
                         if client.config.verify else None)
        self._stats = PipelineStatistics()
        self._seq = 0  # the last chained step's number
        self._fence = 0  # plain steps tell servers to drop relayed steps numbered up to this
        self._chain_after = 0  # no chaining before step number this (counted from 1, as ``steps``)
        self._chain_s = 0.0  # EWMA of a chained step's time

    def statistics(self) -> PipelineStatistics:
        return dataclasses.replace(self._stats)

    @property
    def wave(self) -> tuple[str, ...]:
        """The head's lockstep group of this generation (``HeadBatcher``): its route's peers."""
        return tuple(h.peer_id for h in self.hops)

    @property
    def route(self) -> list[dict[str, Any]]:
        return [{"peer_id": h.peer_id, "blocks": [h.start, h.end]} for h in self.hops]

    async def open(self) -> None:
        self.client.track(self)  # its chain is one the client's next routes follow
        try:
            self.hops, _ = await self._open_span(self.start, self.client.model.n_blocks, [])
        finally:
            self.routing = []

    async def forward(self, hidden: np.ndarray, position: int) -> np.ndarray:
        """Run ``hidden`` (positions ``position..``) through the local blocks (if any), then every
        hop, failing over as needed. Raises GenerationFailed."""
        x = hidden
        local = self.client.model.local
        if local is not None:
            assert self._local_cache is not None  # made with local
            x = await trio.to_thread.run_sync(local.forward, x, self._local_cache, position)
        self._stats.steps += 1
        if self._chainable(x):
            out = await self._chain(x, position)
            if out is not None:
                i = 0
                while i < len(self.hops):  # a hop's server asked us to move its session
                    if self.hops[i].state is State.DRAINING:
                        replaced, _ = await self._move(i, "draining")
                        self.hops[i:i + 1] = replaced
                        i += len(replaced) - 1
                    i += 1
                return out
        i = 0
        while i < len(self.hops):
            hop = self.hops[i]
            try:
                out = await self._step(hop, x, position)
                hop.inputs.append(x)
            except StageFailure as e:
                replaced, out = await self._fail_over(i, e, pending=x)
                self.hops[i:i + 1] = replaced
                i += len(replaced) - 1
            else:
                if hop.state is State.DRAINING:
                    replaced, _ = await self._move(i, "draining")
                    self.hops[i:i + 1] = replaced
                    i += len(replaced) - 1
            x = out
            i += 1
        return x

    async def aclose(self) -> None:
        """Close every hop session (receipts included), all at once, shielded and bounded."""
        self.client.untrack(self)
        if self.verifier is not None:
            await self.verifier.aclose()
        for hop in self.hops:
            hop.release()  # at once: the closes below may run out of time
        # Every hop at once: a client that goes away frees its sessions on all stage servers
        # within one round trip, not one per hop.
        with trio.CancelScope(shield=True), trio.move_on_after(RECEIPT_TIMEOUT_S + 1.0):
            async with trio.open_nursery() as nursery:
                for hop in self.hops:
                    nursery.start_soon(hop.close)

    # -- chaining ------------------------------------------------------------------------------
    def _chainable(self, x: np.ndarray) -> bool:
        return (self.client.config.chain and len(self.hops) >= 2 and self._stats.steps >= self._chain_after
                and 0 < x.shape[0] <= S.CHAIN_MAX_ROWS and all(h.chainable for h in self.hops))

    async def _chain(self, x: np.ndarray, position: int) -> np.ndarray | None:
        """Send ``x`` through every hop as one chained step; the last hop returns every hop's
        output and signature. Returns the last output, or None when the chain failed (no ban:
        a broken chain does not show who broke it; the caller redoes the step hop by hop).
        Cancelled: every hop's session is given up."""
        hops, rows = list(self.hops), x.shape[0]
        first, last = hops[0], hops[-1]
        self._seq += 1
        seq = self._seq
        sent = encode_hidden(x, self.client.config.wire_dtype)
        # _chainable: every hop has its session number and relay token.
        chain = tuple(S.ChainHop(h.peer_id, h.session, h.relay) for h in hops[1:])  # type: ignore[arg-type]
        full = sum(h.deadline(rows) for h in hops)
        wait = min(full, max(CHAIN_MIN_WAIT_S, CHAIN_WAIT_FACTOR * self._chain_s)) if self._chain_s else full
        started = time.monotonic()
        for hop in hops:
            hop.join_chain()
        try:
            before_s, before_r = first.bytes_sent, last.bytes_received
            await first.send_chained(S.Step(position, sent, chain, seq), wait)
            result = await last.chain_reply(seq, wait)
            self._stats.bytes_sent += first.bytes_sent - before_s
            self._stats.bytes_received += last.bytes_received - before_r
            exchanges = self._check_chain(hops, result, x, sent, position)
        except (NetworkError, RemoteProtocolError, ChainBroken) as e:
            self._broken(hops, seq, rows, f"{type(e).__name__}: {e}")
            return None
        except BaseException:
            for hop in hops:
                hop.chain_cancelled()
            raise
        took = time.monotonic() - started
        self._chain_s = took if not self._chain_s else 0.8 * self._chain_s + 0.2 * took
        self._stats.chained += 1
        shares = _time_shares(hops, [e.ms for e in result.trail]) if rows == 1 else []
        for i, (hop, ex, entry) in enumerate(zip(hops, exchanges, result.trail, strict=True)):
            hop.inputs.append(ex.inputs)
            # The last hop's own entry came on its own stream: authentic. Another hop's flag could
            # be forged on the way: ask that hop itself, with the next step going hop by hop.
            hop.chain_done(rows, draining=entry.draining and hop is last)
            if entry.draining and hop is not last:
                self._chain_after = self._stats.steps + 2
            if shares:  # decode steps only, as in _step
                self.client.record_step(hop.peer_id, took * shares[i], hop.end - hop.start)
            if self.verifier is not None:
                self.verifier.record(hop, ex)
        return exchanges[-1].out

    def _check_chain(self, hops: list[HopSession], result: S.ChainResult, x: np.ndarray,
                     sent: EncodedTensor, position: int) -> list[Exchange]:
        """Every hop's output and commitment, checked as a plain step's reply would be; raises
        ChainBroken on any flaw (whoever relayed last may have tampered: no one is blamed)."""
        if result.position != position or len(result.trail) != len(hops):
            raise ChainBroken(f"chain_result for position {result.position} with {len(result.trail)} "
                              f"entries, expected {position} with {len(hops)}")
        out: list[Exchange] = []
        inputs, enc = x, sent
        for hop, entry in zip(hops, result.trail, strict=True):
            try:
                rows = hop.check_reply(S.StepResult(position, entry.hidden), position, x.shape)
                commitment = hop.commitment(enc, entry.hidden, position, x.shape[0])
                commitment.verify(entry.sig)
            except RemoteProtocolError as e:
                raise ChainBroken(f"entry of {hop.peer_id[-8:]}: {e}") from None
            out.append(Exchange(position, inputs, enc, entry.hidden, rows, commitment, entry.sig))
            inputs, enc = rows, entry.hidden
        return out

    def _broken(self, hops: list[HopSession], seq: int, rows: int, why: str) -> None:
        """A chained step failed: fence it off on every server (the next plain steps say so), go
        hop by hop for a while, and remember what the servers may have computed (receipts)."""
        log.info("chained step %d failed (%s); redoing it hop by hop", seq, why)
        self._stats.chain_failures += 1
        self._fence = seq
        self._chain_after = self._stats.steps + CHAIN_RETRY_AFTER
        for hop in hops:
            hop.chain_broken(rows)

    # -- one hop -------------------------------------------------------------------------------
    async def _step(self, hop: HopSession, x: np.ndarray, position: int) -> np.ndarray:
        """Send one step to ``hop``; return its output. Raises StageFailure."""
        started = time.monotonic()
        ex = await self._exchange(hop, x, position)
        if x.shape[0] == 1:  # decode steps only: comparable across peers and prompts
            self.client.record_step(hop.peer_id, time.monotonic() - started, hop.end - hop.start)
        if self.verifier is not None and ex.commitment is not None:
            self.verifier.record(hop, ex)
        return ex.out

    async def _exchange(self, hop: HopSession, x: np.ndarray, position: int) -> Exchange:
        """``hop.step``, its bytes counted. Raises StageFailure."""
        before_s, before_r = hop.bytes_sent, hop.bytes_received
        ex = await hop.step(x, position, fence=self._fence)
        self._stats.bytes_sent += hop.bytes_sent - before_s
        self._stats.bytes_received += hop.bytes_received - before_r
        return ex

    # -- routing and failover ------------------------------------------------------------------
    async def _open_span(self, start: int, end: int, history: list[np.ndarray],
                         pending: np.ndarray | None = None
                         ) -> tuple[list[HopSession], np.ndarray | None]:
        """Route ``[start, end)``, open sessions, and replay ``history`` (+ ``pending``) through
        them. Returns the hops and the span's output for ``pending``. Raises GenerationFailed."""
        client = self.client
        attempts = 0
        while True:
            attempts += 1
            try:
                route = client.find_route(start, end)
            except NoRoute as e:
                raise GenerationFailed(f"no route for blocks [{start}, {end}): {e}") from None
            # Held at once: a concurrent generation routing now sees them.
            hops = [HopSession(client.hop_env, h.peer_id, h.start, h.end, held=True) for h in route]
            if not self.hops:  # the whole route (not a failover's span): followed from now on
                self.routing = route
            try:
                for hop in hops:
                    await hop.open(self.max_length)
                return hops, await self._replay(hops, history, pending)
            except StageFailure as e:
                (log.warning if e.ban else log.info)("route %s failed%s: %s", [h.peer_id[-8:] for h in hops],
                                                     " (peer banned)" if e.ban else "", e)
                client.avoid(e.hop.peer_id, e.ban, unreachable=e.unreachable)
                for hop in hops:
                    await (hop.abandon() if hop is e.hop else hop.close())
                self._stats.failovers += 1
                if attempts > client.config.max_failovers:
                    raise GenerationFailed(f"gave up on blocks [{start}, {end}) after "
                                           f"{attempts} attempts: {e}") from None

    async def _replay(self, hops: list[HopSession], history: list[np.ndarray],
                      pending: np.ndarray | None) -> np.ndarray | None:
        """Rebuild the new hops' KV caches: push every past input (and ``pending``) through them
        in one step from position 0. Returns the output rows for ``pending``."""
        chunks = [*history, *([pending] if pending is not None else [])]
        if not chunks:
            return None
        x = np.concatenate(chunks, axis=0)
        for hop in hops:
            out = await self._step(hop, x, 0)
            hop.inputs = [x[: x.shape[0] - (pending.shape[0] if pending is not None else 0)]]
            if pending is not None:
                hop.inputs.append(x[x.shape[0] - pending.shape[0]:])
            x = out
        return x[x.shape[0] - pending.shape[0]:] if pending is not None else None

    async def _fail_over(self, i: int, failure: StageFailure,
                         pending: np.ndarray) -> tuple[list[HopSession], np.ndarray]:
        lost = self.hops[i]
        log.warning("hop failed, re-routing blocks [%d, %d): %s", lost.start, lost.end, failure)
        self.client.avoid(lost.peer_id, failure.ban)
        if self.verifier is not None:
            self.verifier.retire(lost)
        self._stats.failovers += 1
        if self._stats.failovers > self.client.config.max_failovers:
            raise GenerationFailed(f"too many failures; last: {failure}")
        await lost.abandon()
        hops, out = await self._open_span(lost.start, lost.end, lost.inputs, pending)
        assert out is not None  # pending was given
        return hops, out

    async def _move(self, i: int, why: str) -> tuple[list[HopSession], None]:
        """Move hop ``i`` (already up to date) elsewhere, e.g. because its node is draining."""
        old = self.hops[i]
        log.info("moving blocks [%d, %d) off %s (%s)", old.start, old.end, old.peer_id[-8:], why)
        self.client.avoid(old.peer_id, ban=False)
        try:
            hops, _ = await self._open_span(old.start, old.end, old.inputs)
        except GenerationFailed:
            old.keep()  # nowhere to go: keep using it while it still serves us
            return [old], None
        if self.verifier is not None:
            self.verifier.retire(old)
        await old.close()
        return hops, None

    async def rollback(self, gen: Generation, position: int) -> int:
        """Go back to ``position`` (a verdict's; an earlier one that comes meanwhile wins):
        discard the tokens computed from a wrong output, rebuild hops whose peer is now banned
        (replay on good peers), and let the other hops' next step truncate their caches. Returns
        how many new tokens were discarded. Raises GenerationFailed."""
        verifier = self.verifier
        if verifier is None:
            return 0
        checks = await verifier.locked()
        try:
            position = min([position, *(v.position for v in verifier.verdicts())])
            before = len(gen.new_ids)
            gen.rewind(position)
            discarded = before - len(gen.new_ids)
            log.warning("rolling back to position %d: %d token(s) discarded", position, discarded)
            verifier.truncate(position, discarded)
            for hop in self.hops:
                hop.inputs = _truncate_rows(hop.inputs, position)
            banned = self.client.banned()
            i = 0
            while i < len(self.hops):
                hop = self.hops[i]
                if hop.peer_id in banned:
                    if verifier.convicted(hop):
                        hop.tally.reject()  # what it returned after the window it was caught in, too
                    await hop.abandon()
                    replaced, _ = await self._open_span(hop.start, hop.end, hop.inputs)
                    self.hops[i:i + 1] = replaced
                    i += len(replaced)
                else:
                    i += 1
            return discarded
        finally:
            for check in checks:
                check.lock.release()


def _truncate_rows(chunks: list[np.ndarray], position: int) -> list[np.ndarray]:
    """The rows of positions ``[0, position)`` of ``chunks`` (consecutive arrays from 0)."""
    out, at = [], 0
    for x in chunks:
        if at >= position:
            break
        out.append(x[:position - at])
        at += x.shape[0]
    return out
