"""One hop session of the fleet client: the stream to one stage server, the client's side of the
session protocol (``protocols.session.ClientSession``), the session's work tally and its receipt.

A :class:`HopSession` opens the session, sends steps and checks every reply (dtype, position,
shape, range, the server's signature over the step commitment), takes part in chained steps
(``docs/PROTOCOL.md`` 6.5), and ends with a receipt exchange (closed normally, moved, or abandoned
after a failure: then in the background, bounded by ``RECEIPT_TIMEOUT_S``). Its state is the
machine's (``state``): no loose flags. A failure is raised as :class:`StageFailure` and leaves the
session FAILED (only a receipt and a close may follow). What it observes goes to the client's
counters (``stats.ClientCounters``); nothing else writes them for it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from idlefleet.node.client.config import ClientConfig
from idlefleet.node.client.stats import ClientCounters
from idlefleet.node.owner.ledger import ReceiptDesk
from idlefleet.p2p.errors import DeadlineExceeded, NetworkError, RemoteError
from idlefleet.p2p.framing import FramedStream
from idlefleet.protocols import session as S
from idlefleet.protocols import wire
from idlefleet.protocols.errors import IdlefleetError, RemoteProtocolError
from idlefleet.protocols.receipts import Receipt, WorkTally, check_countersigned, propose
from idlefleet.protocols.tensors import EncodedTensor, TensorLimits, decode_hidden, encode_hidden
from idlefleet.protocols.verification import StepCommitment, row_digests, rows_root

log = logging.getLogger(__name__)

# The whole receipt exchange of one hop (proposal, countersigned reply, our ledger commit).
RECEIPT_TIMEOUT_S = 2.0
STALE_REPLIES = 8  # unasked chain_result / chain_failed frames skipped before a step's reply
_CHAIN_FRAMES = ("chain_result", "chain_failed")
State = S.ClientState


class StageFailure(Exception):
    """One hop failed; ``ban`` says whether to avoid the peer for a while, ``unreachable`` that
    it was a session that could not be opened for a network error (a last resort, not a fault)."""

    def __init__(self, hop: HopSession, why: str, *, ban: bool = True, unreachable: bool = False) -> None:
        super().__init__(f"{hop.peer_id[-8:]} [{hop.start}, {hop.end}): {why}")
        self.hop = hop
        self.ban = ban
        self.unreachable = unreachable


class ChainBroken(Exception):
    """A chained step did not come back whole (the pipeline redoes it hop by hop, blaming no one)."""


@dataclass(frozen=True)
class Exchange:
    """One step as it travelled: the rows sent (``inputs``, encoded as ``sent``), the reply
    (``received``, decoded as ``out``) and the server's signed commitment (None on our own
    stage's loopback hop)."""

    position: int
    inputs: np.ndarray
    sent: EncodedTensor
    received: EncodedTensor
    out: np.ndarray
    commitment: StepCommitment | None
    sig: bytes | None

    def head(self, n: int) -> Exchange:
        """The first ``n`` rows (``sent``, ``received`` and the commitment stay whole: evidence)."""
        return dataclasses.replace(self, inputs=self.inputs[:n], out=self.out[:n])


@dataclass(frozen=True)
class HopEnv:
    """What every hop session of one client shares (made by ``FleetClient``)."""

    me: str  # our peer id: the commitments' and receipts' client
    model_id: str
    config: ClientConfig
    limits: TensorLimits
    hidden_size: int
    flops_per_token_block: float
    desk: ReceiptDesk | None  # our key and ledger for receipts (None: no receipts)
    counters: ClientCounters
    # A session stream to a peer (to our own stage server: a loopback). Raises NetworkError.
    connect: Callable[[str], Awaitable[FramedStream]]
    # Start a background task in the node's nursery; RuntimeError when the node is stopping.
    spawn: Callable[..., None]


class HopSession:
    """The client's session with ``peer_id`` for blocks ``[start, end)``. ``held``: counted in the
    client's open sessions on that peer (route choice) until closed or abandoned."""

    def __init__(self, env: HopEnv, peer_id: str, start: int, end: int, *, held: bool = False) -> None:
        self.env = env
        self.peer_id = peer_id
        self.start = start
        self.end = end
        self.machine = S.ClientSession()
        self.stream: FramedStream | None = None
        self.tally = WorkTally()  # this session's work, for its receipt
        # Every input this hop computed, in position order (the pipeline's replay history for it).
        self.inputs: list[np.ndarray] = []
        self.opened_at = time.time()
        self.session: int | None = None  # the server's number (session_opened): commitments, receipt
        self.relay: bytes | None = None  # session_opened's relay token: this server takes chained steps
        self._ahead = 0  # rows of a chained step we gave up on that the server may have computed
        self._failure: StageFailure | None = None  # why it failed, raised again at its next step
        self._held = held
        if held:
            env.counters.hold(peer_id)

    @property
    def state(self) -> S.ClientState:
        return self.machine.state

    @property
    def length(self) -> int:
        return sum(x.shape[0] for x in self.inputs)

    @property
    def remote(self) -> bool:
        return self.peer_id != self.env.me

    @property
    def chainable(self) -> bool:
        """It may take part in a chained step: a peer's open session that offered a relay token."""
        return (self.state is State.OPEN and self.relay is not None and self.session is not None
                and self.remote)

    @property
    def bytes_sent(self) -> int:
        return self.stream.bytes_sent if self.stream is not None else 0

    @property
    def bytes_received(self) -> int:
        return self.stream.bytes_received if self.stream is not None else 0

    def deadline(self, tokens: int) -> float:
        c = self.env.config
        return c.step_timeout_s + c.step_timeout_per_token_block_s * tokens * (self.end - self.start)

    # -- opening -------------------------------------------------------------------------------
    async def open(self, max_length: int) -> None:
        """Open the session (``max_length`` positions). Raises StageFailure: a refusal (busy,
        draining) without a ban, a network error as ``unreachable``, a bad reply with a ban.
        Cancelled: the session is FAILED (closed by its owner)."""
        env = self.env
        timeout = env.config.open_timeout_s
        req = S.OpenRequest(env.model_id, self.start, self.end, max_length, env.config.wire_dtype)
        try:
            self.stream = await env.connect(self.peer_id)
            self.machine.send("session_open")
            await self.stream.send("session_open", req.to_body(), timeout=timeout)
            reply = await self._receive(self.stream, timeout, skip=())
            self.machine.receive(reply.kind)  # session_opened, else RemoteProtocolError
            self._opened(reply.body)
            env.counters.session_opened(self.peer_id)
        except RemoteError as e:
            # A refusal (busy, draining, wrong blocks) is not a fault: avoid the peer only briefly.
            raise StageFailure(self, f"refused: {e}",
                               ban=e.code not in (S.ERR_BUSY, S.ERR_DRAINING)) from None
        except NetworkError as e:
            self._give_up()
            raise StageFailure(self, f"open failed: {e}", unreachable=True) from None
        except RemoteProtocolError as e:
            self._give_up()
            raise StageFailure(self, f"open failed: {e}") from None
        except BaseException:
            self._give_up()
            raise

    def _opened(self, body: dict[str, Any]) -> None:
        """Check ``session_opened``'s body; raises RemoteProtocolError."""
        hidden, session = body.get("hidden"), body.get("session")
        if type(session) is not int or not 0 <= session < 2**63:
            raise RemoteProtocolError(f"session_opened: bad session number {session!r}")
        self.session = session
        relay = body.get("relay")
        if relay is not None and not (isinstance(relay, bytes) and len(relay) == S.RELAY_TOKEN_LEN):
            raise RemoteProtocolError(f"session_opened: relay must be {S.RELAY_TOKEN_LEN} bytes")
        self.relay = relay
        if hidden != self.env.hidden_size:
            raise RemoteProtocolError(f"session_opened says hidden size {hidden!r}, the model has "
                                      f"{self.env.hidden_size}")

    # -- steps -----------------------------------------------------------------------------------
    async def step(self, x: np.ndarray, position: int, *, fence: int = 0) -> Exchange:
        """Send rows ``x`` for positions ``position..`` and check the reply, its signature included
        (our own stage's loopback hop needs none); the rows count in the tally. Raises
        StageFailure (the session is then FAILED; a session already FAILED raises its failure
        again). Cancelled: FAILED too (the reply may still come: the receipt exchange skips it)."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if self.stream is None or self.state not in (State.OPEN, State.DRAINING):
            raise StageFailure(self, "no session")
        sent = encode_hidden(x, self.env.config.wire_dtype)
        body = S.Step(position, sent, fence=fence).to_body()
        deadline = self.deadline(x.shape[0])
        try:
            self.machine.send("step")
            await self.stream.send("step", body, timeout=deadline)
            reply = await self._receive(self.stream, deadline)
            self.machine.receive(reply.kind)
            if reply.kind != "step_result":  # the last of too many unasked chain frames
                raise RemoteProtocolError(f"expected step_result, got {reply.kind}")
            result = S.StepResult.from_body(reply.body)
            out = self.check_reply(result, position, x.shape)
            if result.ahead and self._ahead:  # it had computed the chained step we gave up on
                self._count(min(result.ahead, self._ahead))
            self._ahead = 0
            commitment = None if not self.remote else self._check_sig(result, sent, position, x.shape[0])
        except RemoteError as e:  # an owner's "stop" ends sessions with draining: not a fault
            raise StageFailure(self, f"step at {position} failed: {e}",
                               ban=e.code != S.ERR_DRAINING) from None
        except (NetworkError, RemoteProtocolError) as e:
            self._give_up()
            raise StageFailure(self, f"step at {position} failed: {e}") from None
        except BaseException:
            self._give_up()
            raise
        self._count(x.shape[0])
        if result.draining:
            self.machine.receive("draining")
        return Exchange(position, x, sent, result.hidden, out, commitment, result.sig)

    def _count(self, rows: int) -> None:
        self.tally.add(rows)
        self.env.counters.computed(self.peer_id, rows)

    async def _receive(self, stream: FramedStream, timeout: float,
                       skip: tuple[str, ...] = _CHAIN_FRAMES) -> wire.Envelope:
        """The next reply, each frame fed to the machine, skipping up to ``STALE_REPLIES`` unasked
        frames of the kinds ``skip`` (of a chained step we gave up on). An ``error`` envelope is
        fed too and raised as RemoteError; an unexpected kind raises RemoteProtocolError."""
        deadline = trio.current_time() + timeout
        for i in range(STALE_REPLIES + 1):
            try:
                reply = await stream.receive_reply(timeout=max(0.001, deadline - trio.current_time()))
            except RemoteError:
                self.machine.receive("error")
                raise
            if reply.kind not in skip or i == STALE_REPLIES:
                return reply
            self.machine.receive(reply.kind)
        raise AssertionError("unreachable")

    def _check_sig(self, result: S.StepResult, sent: EncodedTensor, position: int,
                   tokens: int) -> StepCommitment:
        """The commitment the server must have signed for this step, rebuilt from what we sent and
        received; RemoteProtocolError if the signature is missing or does not verify."""
        if result.sig is None:
            raise RemoteProtocolError("step_result carries no commitment signature")
        commitment = self.commitment(sent, result.hidden, position, tokens)
        commitment.verify(result.sig)
        return commitment

    def commitment(self, sent: EncodedTensor, received: EncodedTensor, position: int,
                   tokens: int) -> StepCommitment:
        """The step commitment (docs/PROTOCOL.md 7.2) the server signs for these rows."""
        assert self.session is not None  # set when the session opened, before any step
        return StepCommitment(self.peer_id, self.env.me, self.env.model_id, self.start, self.end,
                              self.session, position, tokens, rows_root(row_digests(sent)),
                              rows_root(row_digests(received)))

    def check_reply(self, result: S.StepResult, position: int, shape: tuple[int, ...]) -> np.ndarray:
        """The reply's hidden states, or RemoteProtocolError (a bad reply from that peer): another
        dtype than the session's, another position or shape, NaN/inf, or values beyond
        ``max_hidden_abs`` (an int8 scale of 3e38 would otherwise turn every logit into NaN and
        the "generated" text into token 0)."""
        want = self.env.config.wire_dtype
        if result.hidden.dtype != want:
            raise RemoteProtocolError(f"step_result dtype {result.hidden.dtype}, session dtype {want}")
        with np.errstate(over="ignore", invalid="ignore"):
            out = decode_hidden(result.hidden, self.env.limits)
            peak = float(np.abs(out).max())
        if result.position != position or out.shape != shape:
            raise RemoteProtocolError(f"step_result for position {result.position} shape "
                                      f"{out.shape}, expected {position} {shape}")
        if not peak <= self.env.config.max_hidden_abs:  # NaN fails this too
            raise RemoteProtocolError(f"step_result values out of range (max |x| = {peak:.3g})")
        return out

    def keep(self) -> None:
        """A draining session stays in use (there is nowhere to move it)."""
        self.machine.send("keep")

    def _give_up(self) -> None:
        if self.state in (State.OPENING, State.OPEN, State.STEPPING, State.CHAINED, State.DRAINING):
            self.machine.send("fail")

    # -- chaining (docs/PROTOCOL.md 6.5) ---------------------------------------------------------
    def join_chain(self) -> None:
        """This session is one hop of the chained step about to go (its server computes it)."""
        self.machine.send("chained_step")

    async def send_chained(self, step: S.Step, timeout: float) -> None:
        """Send the chained step (on the first hop, after ``join_chain``). Raises NetworkError."""
        assert self.stream is not None  # chainable
        await self.stream.send("step", step.to_body(), timeout=timeout)

    async def chain_reply(self, seq: int, wait: float) -> S.ChainResult:
        """The ``chain_result`` numbered ``seq`` on this (the last hop's) stream, skipping stale
        unasked frames. Raises ChainBroken, NetworkError or RemoteProtocolError; an ``error``
        (the session ended: owner stop, idle) leaves it FAILED, raised at its next step."""
        assert self.stream is not None  # chainable
        deadline = trio.current_time() + wait
        for _ in range(STALE_REPLIES + 1):
            left = deadline - trio.current_time()
            if left <= 0:
                break
            try:
                env = await self.stream.receive_reply(timeout=left)
            except RemoteError as e:  # its fault
                self.machine.receive("error")
                self._failure = StageFailure(self, f"chained step failed: {e}", ban=e.code != S.ERR_DRAINING)
                raise ChainBroken(str(e)) from None
            self.machine.receive(env.kind)  # chain_result or chain_failed, else RemoteProtocolError
            if env.kind == "chain_failed":
                if env.body.get("seq") == seq:
                    raise ChainBroken(f"{self.peer_id[-8:]}: {str(env.body.get('message', ''))[:200]}")
                continue
            result = S.ChainResult.from_body(env.body)
            if result.seq == seq:
                return result
        raise ChainBroken(f"no chain_result within {wait:.2f}s")

    def chain_done(self, rows: int, *, draining: bool) -> None:
        """The chained step's entry of this hop checked out: its rows count; ``draining``: its own
        flag, authentic (it came on this session's stream)."""
        self.machine.send("chain_done")
        self._ahead = 0
        self._count(rows)
        if draining:
            self.machine.receive("draining")

    def chain_broken(self, rows: int) -> None:
        """The chained step failed: the server may have computed its ``rows`` (credited when a
        redo's ``step_result`` says ``ahead``). A session that failed meanwhile stays FAILED."""
        if self.state is State.CHAINED:
            self.machine.send("chain_broken")
        self._ahead = rows

    def chain_cancelled(self) -> None:
        """The caller was cancelled mid-chain: the session is given up (closed by its owner)."""
        self._give_up()

    # -- the end ---------------------------------------------------------------------------------
    def release(self) -> None:
        """No longer counted in the client's open sessions on the peer (idempotent)."""
        if self._held:
            self._held = False
            self.env.counters.release(self.peer_id)

    async def close(self) -> None:
        """Exchange the receipt, close the session and the stream (bounded; never raises
        NetworkError or RemoteProtocolError). The stream goes whatever happens, even on
        cancellation: a stream left open holds the session (and its KV budget) on the server."""
        self.release()
        if self.stream is None:
            return
        stream, self.stream = self.stream, None
        closed = False
        try:
            if self.state in (State.OPENING, State.STEPPING, State.CHAINED):
                self._give_up()  # cancelled mid-request: no more steps
            if self.state is State.IDLE:
                return
            await self._exchange_receipt(stream)
            self.machine.send("session_close")
            await stream.send("session_close", {}, timeout=1.0)
            self.machine.receive((await stream.receive(timeout=1.0)).kind)
            closed = True
        except (NetworkError, RemoteProtocolError):
            pass
        finally:
            if self.state is not State.CLOSED:
                self.machine.send("reset")
            with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                await (stream.aclose() if closed else stream.reset())

    async def abandon(self) -> None:
        """Drop a failed session without waiting on a peer that may be frozen. Its receipt
        exchange is still attempted (a server caught by verification gets a receipt that says
        rejected), in the node's nursery within ``RECEIPT_TIMEOUT_S``, so failover does not wait."""
        self.release()
        stream, self.stream = self.stream, None
        if stream is None:
            return
        self._give_up()
        if self._wants_receipt():
            self.env.counters.receipt_started()  # counted now: the task starts later
            try:
                self.env.spawn(self._settle_abandoned, stream)
                return
            except RuntimeError:  # the node is stopping: no exchange
                self.env.counters.receipt_ended()
        self.machine.send("reset")
        with trio.move_on_after(0.2):
            await stream.reset()

    async def _settle_abandoned(self, stream: FramedStream) -> None:
        try:
            await self._exchange_receipt(stream)
        finally:
            self.env.counters.receipt_ended()
            self.machine.send("reset")
            with trio.CancelScope(shield=True), trio.move_on_after(0.2):
                await stream.reset()

    # -- receipts (docs/PROTOCOL.md 6.3, 7.3) ----------------------------------------------------
    def _wants_receipt(self) -> bool:
        """A receipt is exchanged for a peer's session that computed something (not our own
        stage: a receipt needs two parties)."""
        desk = self.env.desk
        return (desk is not None and self.peer_id != desk.peer_id and self.session is not None
                and self.tally.tokens > 0)

    def receipt(self, client_id: str) -> Receipt:
        tally, blocks = self.tally, self.end - self.start
        assert self.session is not None  # _wants_receipt
        opened = float(self.opened_at)
        return Receipt(server=self.peer_id, client=client_id, model_id=self.env.model_id,
                       start=self.start, end=self.end, session=self.session, opened_at=opened,
                       closed_at=max(opened, time.time()), tokens=tally.tokens,
                       block_steps=tally.tokens * blocks,
                       flops=self.env.flops_per_token_block * (tally.tokens * blocks),
                       verified=tally.verified, unverified=tally.unverified, rejected=tally.rejected)

    async def _exchange_receipt(self, stream: FramedStream) -> None:
        """Propose the session's receipt (signed by us), check the server's countersigned reply and
        store it in our ledger; or record why not (the server's error code, ``no_reply``,
        ``link_lost``, ``bad_countersignature``). Bounded by ``RECEIPT_TIMEOUT_S``; never raises."""
        env, desk = self.env, self.env.desk
        if desk is None or not self._wants_receipt():
            return
        receipt = self.receipt(desk.peer_id)
        body = propose(receipt, desk.key)
        reason = detail = ""
        with trio.move_on_after(RECEIPT_TIMEOUT_S) as scope:
            try:
                self.machine.send("receipt_proposal")
                await stream.send("receipt_proposal", body, timeout=RECEIPT_TIMEOUT_S)
                reply = await self._receive(stream, RECEIPT_TIMEOUT_S)
                self.machine.receive(reply.kind)
                if reply.kind == "step_result":  # the late reply to a step we gave up on
                    reply = await self._receive(stream, RECEIPT_TIMEOUT_S)
                    self.machine.receive(reply.kind)
                if reply.kind != "receipt" or set(reply.body) != {"receipt"}:
                    raise RemoteProtocolError(f"expected receipt, got {reply.kind}")
                raw = reply.body["receipt"]
                check_countersigned(raw, receipt)
            except RemoteError as e:
                reason, detail = e.code, e.message
            except DeadlineExceeded as e:
                reason, detail = "no_reply", str(e)
            except NetworkError as e:
                reason, detail = "link_lost", str(e)
            except RemoteProtocolError as e:
                reason, detail = "bad_countersignature", str(e)
        if scope.cancelled_caught:
            reason, detail = "no_reply", f"no receipt within {RECEIPT_TIMEOUT_S}s"
        try:
            if not reason:
                env.counters.receipt_stored()
                if desk.ledger is not None:
                    await trio.to_thread.run_sync(desk.ledger.add, raw, "client")
                return
            env.counters.receipt_refused(reason)
            # A server that lied is worth a warning; a refusal, a dead link or no ledger is routine.
            (log.warning if reason == "bad_countersignature" else log.info)(
                "no receipt from %s for session %d: %s %s", self.peer_id[-8:], receipt.session, reason,
                detail)
            if desk.ledger is not None:
                await trio.to_thread.run_sync(functools.partial(
                    desk.ledger.add_refused, self.peer_id, receipt.session, reason, detail, wire.pack(body)))
        except (sqlite3.Error, OSError, IdlefleetError) as e:  # our own disk: never end a generation
            log.error("ledger: cannot record the receipt of session %d: %r", receipt.session, e)
