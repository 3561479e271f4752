"""The stage server: serves one block range of a model to pipeline sessions over libp2p streams.

One stream is one session (``protocols.session``). Each session owns a KV cache whose worst case
(``max_length`` positions) is reserved against the server's KV memory budget when it opens, so the
server's memory stays within budget however clients behave. A session that sends no valid message
for the idle timeout (invalid steps do not count), or sends ``max_invalid_steps`` invalid steps in
a row, is closed and its cache freed. Compute runs one at a time per process (the machine's cores
are shared by several nodes), in a worker thread, so heartbeats and gossip never wait on a long
step; a lone one-row step (single-stream decode, ``inline_rows``) is computed on the event loop,
which saves two thread hand-offs per hop (``node.batcher``). Steps of concurrent sessions arriving
within a short window are computed together, so a stage holding 8 sessions reads its weights once
per round, not 8 times.

Fair shares: one peer may hold at most ``peer_share`` of the sessions and of the KV budget, and
have at most ``max_inflight_per_peer`` steps queued or computing. A long step (a prefill) is
computed in chunks of at most ``prefill_chunk_tokens`` positions whose attention and MLP working
memory stays under ``workspace_bytes``; other sessions' steps run between chunks (each chunk goes
through the batcher like any step).

Receipts: when the client proposes the session's receipt (``receipt_proposal``), the server checks
it against its own count (``protocols.receipts.check_proposal``), countersigns it, commits it to its
ledger (``node.ledger``, fsync) and only then replies with it: an acknowledged receipt survives a
SIGKILL. One proposal per session; a server without a ledger refuses with ``receipts_unsupported``.

Signed work: a server with an identity (``key``, the node's Ed25519 key) signs every step it returns:
the ``step_result`` carries its signature over the step's commitment (``protocols.verification``:
server, client, model, blocks, session number, positions, and the roots of the input and output
rows exactly as they travel), so a wrong output is evidence against it. ``fault`` (test tooling,
``node.faults``) falsifies outputs *before* they are committed to, as a cheat would.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.faults import FaultInjector
from idlefleet.node.model.batcher import StepBatcher, acquire
from idlefleet.node.model.kvcache import KVCache
from idlefleet.node.model.stage import Stage
from idlefleet.node.owner.ledger import DuplicateReceipt, ReceiptDesk
from idlefleet.node.serve.latency import LatencyHistogram
from idlefleet.p2p.errors import DeadlineExceeded, NetworkError, StreamClosed
from idlefleet.p2p.framing import FramedStream
from idlefleet.protocols import session as S
from idlefleet.protocols.errors import (
    LocalProtocolError,
    ModelInputError,
    RemoteProtocolError,
    RemoteTensorError,
    TensorError,
)
from idlefleet.protocols.peerid import peer_id_from_public_key, public_key_from_peer_id
from idlefleet.protocols.receipts import ReceiptRefused, SessionWork, check_proposal, flops_per_token_block
from idlefleet.protocols.serving import ADMITTING, Serving
from idlefleet.protocols.tensors import EncodedTensor, TensorLimits, decode_hidden, encode_hidden
from idlefleet.protocols.verification import StepCommitment, row_digests, rows_root

log = logging.getLogger(__name__)

# Session numbers are unique per node across restarts and re-loads (they name a session in its
# receipt, and a ledger holds one receipt per session): one process-wide counter that starts at
# the process's start time in microseconds.
_SESSION_IDS = itertools.count(time.time_ns() // 1000)


@dataclass(frozen=True)
class ServerConfig:
    max_sessions: int = 16
    kv_budget_bytes: int = 256 * 1024 * 1024
    idle_timeout_s: float = 60.0
    max_step_tokens: int = 4096
    send_timeout_s: float = 10.0
    peer_share: float = 0.5  # of max_sessions and of kv_budget_bytes, for any one peer
    max_inflight_per_peer: int = 8  # steps of one peer queued or computing; more wait their turn
    max_invalid_steps: int = 3  # invalid steps in a row before the session is ended
    prefill_chunk_tokens: int = 128  # a step is computed in chunks of at most this many positions
    workspace_bytes: int = 32 * 1024 * 1024  # working memory (attention scores, MLP) of one chunk
    # How long a step may wait for other sessions' steps (batching). Only steps of sessions that
    # are due wait (a lone one never does); 6 ms measured best for 8 lockstep streams on a
    # 6-node swarm (bench.throughput: 2 ms 2.28x, 6 ms 2.61x, 10 ms 2.37x one stream).
    batch_window_s: float = 0.006
    # How long a step waits for due sessions of the same client as a step already queued (its
    # generations leave its LM head together: node/model/batcher.py). On a loaded 2-core machine they
    # arrive up to ~25 ms apart: with 6 ms, 8 streams on 6 nodes made batches of 1-2 out of 4
    # sessions per node; with 25 ms, 4 (bench.throughput).
    lockstep_window_s: float = 0.025
    inline_rows: int = 1  # a batch of at most this many rows is computed on the event loop (0: never)


@dataclass
class ServerStatistics:
    sessions_opened: int = 0
    sessions_refused: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0
    bad_requests: int = 0
    idle_closed: int = 0
    invalid_closed: int = 0
    chunks: int = 0
    compute_s: float = 0.0
    step_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # compute per step
    bytes_sent: int = 0  # framed bytes of finished sessions
    bytes_received: int = 0
    batches: int = 0  # compute calls; steps / batches is the mean batch size
    batch_sizes: dict[int, int] = field(default_factory=dict)  # steps per compute call -> calls
    receipts: int = 0  # receipts countersigned and stored
    receipts_refused: dict[str, int] = field(default_factory=dict)  # proposals refused, by code
    relayed: int = 0  # chained steps forwarded to the next hop
    chain_failed: int = 0  # chained steps that could not be computed or forwarded
    relay_dropped: dict[str, int] = field(default_factory=dict)  # relayed steps dropped, by reason


@dataclass(frozen=True)
class _Refused:
    """Why a step that passed the checks is still refused; its input's sender is at fault."""

    code: str  # the ``error`` code of a plain step's reply
    why: str


@dataclass(eq=False)
class _Session:
    """One open session: its client's stream, blocks, KV cache and counts. Steps come from the
    client on ``fs`` or, chained, relayed by the hop before (``relay_step``); ``lock`` keeps them
    one at a time."""

    sid: int
    fs: FramedStream
    req: S.OpenRequest
    stage: Stage
    cache: KVCache
    opened_at: float  # wall clock, for the receipt
    relay: bytes  # the token a relayed step must carry (given to the client in session_opened)
    valid_at: float  # trio clock of the last valid step: the idle timeout runs from it
    lock: trio.Lock = field(default_factory=trio.Lock)
    steps: int = 0
    tokens: int = 0  # positions computed and answered: the receipt's count
    busy: float = 0.0
    invalid: int = 0  # invalid steps in a row
    fence: int = 0  # relayed steps numbered this or lower are dropped (the client gave up on them)
    last_seq: int = 0  # the highest chained step computed
    closing: bool = False  # a receipt was proposed, or the session ended: no relayed steps


class StageServer:
    """Serves ``stage`` (blocks ``[stage.start, stage.end)``) on ``protocols.session.STAGE_PROTOCOL``."""

    def __init__(self, stage: Stage, config: ServerConfig = ServerConfig(),
                 limiter: trio.CapacityLimiter | None = None,
                 on_event: Callable[..., None] | None = None,
                 gate: Callable[[], Serving] | None = None,
                 receipts: ReceiptDesk | None = None,
                 key: Ed25519PrivateKey | None = None,
                 fault: FaultInjector | None = None,
                 relay: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None) -> None:
        self.stage = stage
        # Sends a relay_step body to a peer on RELAY_PROTOCOL (node.hosting); raises NetworkError.
        # None: this server does not chain (it offers no relay token).
        self._relay = relay if key is not None else None
        self._receipts = receipts  # key + ledger: countersign and store receipts (None: refuse)
        self._key = key
        self.peer_id = peer_id_from_public_key(key.public_key().public_bytes_raw()) if key else None
        # Test tooling (--chaos-fault): every step's output goes through fault.apply(x, y) before
        # it is committed and sent, so a faulty server signs its wrong output as a cheat would.
        self.fault = fault
        # Whether this node admits sessions and whether running ones should move
        # (``protocols.serving``): the node decides, the server only asks.
        self._gate = gate or (lambda: ADMITTING)
        self._sessions: set[trio.CancelScope] = set()
        self._on_event = on_event or (lambda event, **fields: None)  # the owner's audit log
        self.config = config
        self.stats = ServerStatistics()
        self._limiter = limiter or trio.CapacityLimiter(1)
        self._batcher = StepBatcher(self._limiter, lambda: self.active_sessions,
                                    window_s=config.batch_window_s,
                                    lockstep_s=config.lockstep_window_s,
                                    max_batch_tokens=config.max_step_tokens,
                                    inline_rows=config.inline_rows, on_batch=self._on_batch)
        self._ids = _SESSION_IDS
        self._reserved: dict[int, int] = {}  # session id -> reserved KV bytes
        self._open: dict[int, _Session] = {}  # session id -> the open session
        self._peer_of: dict[int, str] = {}  # session id -> the peer that opened it
        self._inflight: dict[str, trio.CapacityLimiter] = {}  # peer -> its steps in flight
        self._idle = trio.Event()
        self._idle.set()
        self._busy = 0.0
        self._busy_at = time.perf_counter()
        self._busy_compute = 0.0
        cfg = stage.config
        self._limits = TensorLimits(max_tokens=config.max_step_tokens, hidden_size=cfg.hidden_size)
        # Worst-case KV bytes per position: layers x (K and V) x kv heads x head dim x float32.
        self._kv_bytes_per_pos = len(stage.blocks) * 2 * cfg.n_kv_heads * cfg.head_dim * 4
        self._flops_per_token_block = flops_per_token_block(cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads,
                                                            cfg.head_dim, cfg.ffn_size)

    @property
    def draining(self) -> bool:
        """Whether running sessions are asked to move (step results say ``draining``): read from
        the gate, never set here."""
        return self._gate().move_on

    @property
    def active_sessions(self) -> int:
        return len(self._reserved)

    @property
    def batch_gather_s(self) -> float:
        """Seconds batch leaders waited so far for other sessions' steps (node/model/batcher.py)."""
        return self._batcher.stats.gather_s

    def holds(self, sid: int) -> bool:
        """Whether session ``sid`` is open here."""
        return sid in self._open

    @property
    def reserved_bytes(self) -> int:
        return sum(self._reserved.values())

    @property
    def load(self) -> float:
        """How busy this server is, 0..1: the larger of its session occupancy and the fraction of
        recent time spent computing (steps run one at a time, so that is what queues)."""
        return min(1.0, max(self.active_sessions / self.config.max_sessions, self._busy))

    def sample_busy(self, now: float, alpha: float = 0.5) -> float:
        """Update the busy fraction (EWMA) from compute time since the last call; call ~1/s."""
        elapsed = now - self._busy_at
        if elapsed > 0:
            recent = min(1.0, (self.stats.compute_s - self._busy_compute) / elapsed)
            self._busy = (1 - alpha) * self._busy + alpha * recent
        self._busy_at, self._busy_compute = now, self.stats.compute_s
        return self._busy

    def _on_batch(self, seconds: float, steps: int) -> None:
        self.stats.compute_s += seconds
        self.stats.batches += 1
        self.stats.batch_sizes[steps] = self.stats.batch_sizes.get(steps, 0) + 1

    async def wait_idle(self) -> None:
        """Return once no session is open (used when draining)."""
        await self._idle.wait()

    def _refuse(self, code: str) -> str:
        self.stats.sessions_refused[code] = self.stats.sessions_refused.get(code, 0) + 1
        return code

    def _admit(self, req: S.OpenRequest, peer: str) -> tuple[str, str] | None:
        """Return (code, message) if the session cannot be opened for ``peer``, else None."""
        st = self.stage
        refusal = self._gate().refusal  # draining, closing or the owner's policy says no
        if refusal is not None:
            code, message = refusal
            return self._refuse(code), message
        if req.model_id != st.model_id:
            return self._refuse(S.ERR_WRONG_MODEL), f"this node serves {st.model_id}"
        if not (st.start <= req.start < req.end <= st.end):
            return (self._refuse(S.ERR_WRONG_BLOCKS),
                    f"blocks [{req.start}, {req.end}) not within hosted [{st.start}, {st.end})")
        if req.max_length > st.config.context_length:
            return (self._refuse(S.ERR_BAD_POSITION),
                    f"max_length {req.max_length} exceeds the context of {st.config.context_length}")
        if self.active_sessions >= self.config.max_sessions:
            return self._refuse(S.ERR_BUSY), f"session limit {self.config.max_sessions} reached"
        need = req.max_length * self._kv_bytes_per_pos
        if self.reserved_bytes + need > self.config.kv_budget_bytes:
            return (self._refuse(S.ERR_BUSY),
                    f"KV memory budget exhausted ({self.reserved_bytes + need} > "
                    f"{self.config.kv_budget_bytes} bytes)")
        mine = [sid for sid, p in self._peer_of.items() if p == peer]
        max_mine = max(1, int(self.config.max_sessions * self.config.peer_share))
        if len(mine) >= max_mine:
            return self._refuse(S.ERR_BUSY), f"per-peer share of {max_mine} sessions reached"
        mine_bytes = sum(self._reserved[sid] for sid in mine) + need
        if mine_bytes > self.config.kv_budget_bytes * self.config.peer_share:
            return (self._refuse(S.ERR_BUSY), f"per-peer share of the KV memory budget exhausted "
                    f"({mine_bytes} > {int(self.config.kv_budget_bytes * self.config.peer_share)} bytes)")
        return None

    def _chunk_tokens(self, position: int, remaining: int) -> int:
        """How many of ``remaining`` positions (from ``position``) to compute in one go: at most
        ``prefill_chunk_tokens``, halved until the chunk's working memory fits ``workspace_bytes``
        (attention scores and their mask, float32, for every query head over every cached key,
        plus the QKV, MLP and residual rows)."""
        c = self.stage.config
        per_row = 4 * ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim + 3 * c.ffn_size + 4 * c.hidden_size)
        n = min(remaining, self.config.prefill_chunk_tokens)
        budget = self.config.workspace_bytes
        while n > 1 and n * (4 * (2 * c.n_heads + 1) * (position + n) + per_row) > budget:
            n //= 2
        return n
    def stop_sessions(self) -> int:
        """End every session (and every stream not yet in one) now: the owner policy says stop.
        Returns how many sessions were open."""
        for scope in self._sessions:
            scope.cancel()
        return len(self._reserved)

    async def handle(self, fs: FramedStream) -> None:
        """Serve one session on ``fs`` until the client closes it, it idles out, the link dies,
        or ``stop_sessions`` ends it."""
        with trio.CancelScope() as scope:
            self._sessions.add(scope)
            try:
                await self._handle(fs)
            finally:
                self._sessions.discard(scope)
        if scope.cancelled_caught:  # tell the client at once, so it moves without a timeout
            with trio.move_on_after(1.0), contextlib.suppress(NetworkError):
                await fs.send_error(S.ERR_DRAINING, "stopped by the owner policy; use another peer")

    async def _handle(self, fs: FramedStream) -> None:
        machine = S.SessionMachine()
        sess: _Session | None = None
        valid_at = trio.current_time()  # the idle timeout runs from the last valid message
        try:
            while machine.state is not S.SessionState.CLOSED:
                if sess is not None:
                    valid_at = sess.valid_at  # relayed steps keep the session alive too
                try:
                    left = valid_at + self.config.idle_timeout_s - trio.current_time()
                    env = await fs.receive(timeout=max(0.001, left))
                except StreamClosed:
                    return
                except DeadlineExceeded:
                    if sess is not None and sess.valid_at > valid_at:
                        continue  # chained steps arrived meanwhile (relayed, not on this stream)
                    self.stats.idle_closed += 1
                    await fs.send_error(S.ERR_IDLE, f"no message for {self.config.idle_timeout_s}s")
                    return
                state = machine.receive(env.kind)
                if env.kind == "session_open":
                    req = S.OpenRequest.from_body(env.body)
                    if self._key is not None:  # each step's signed commitment names the client's key
                        public_key_from_peer_id(fs.peer_id)  # RemoteProtocolError unless Ed25519
                    refusal = self._admit(req, fs.peer_id)
                    if refusal is not None:
                        machine.fail_open()
                        await fs.send_error(*refusal)
                        continue
                    sid = next(self._ids)
                    self._reserved[sid] = req.max_length * self._kv_bytes_per_pos
                    self._peer_of[sid] = fs.peer_id
                    self._idle = trio.Event() if len(self._reserved) == 1 else self._idle
                    stage = self.stage.sub_stage(req.start, req.end)  # shares the weights
                    sess = _Session(sid, fs, req, stage, stage.new_cache(capacity=min(64, req.max_length)),
                                    time.time(), secrets.token_bytes(S.RELAY_TOKEN_LEN), trio.current_time())
                    self._open[sid] = sess
                    self.stats.sessions_opened += 1
                    log.info("session %d opened by %s: blocks [%d, %d), max_length %d", sid,
                             fs.peer_id[-8:], req.start, req.end, req.max_length)
                    self._on_event("session_opened", session=sid, client=fs.peer_id,
                                   blocks=[req.start, req.end], max_length=req.max_length)
                    opened: dict[str, Any] = {"session": sid, "start": req.start, "end": req.end,
                                              "hidden": stage.config.hidden_size}
                    if self._relay is not None:  # we can forward chained steps: say so with the token
                        opened["relay"] = sess.relay
                    await fs.send("session_opened", opened, timeout=self.config.send_timeout_s)
                elif env.kind == "step":
                    assert sess is not None  # the state machine guarantees an opened session here
                    if await self._step(sess, env.body):
                        sess.invalid, sess.valid_at = 0, trio.current_time()
                    else:
                        sess.invalid += 1
                        if sess.invalid >= self.config.max_invalid_steps:
                            self.stats.invalid_closed += 1
                            log.info("session %d from %s: %d invalid steps in a row; closed", sess.sid,
                                     fs.peer_id[-8:], sess.invalid)
                            return
                elif env.kind == "receipt_proposal":
                    assert sess is not None  # the state machine guarantees an opened session
                    sess.closing = True  # no more relayed steps
                    if state is S.SessionState.CLOSED:  # a second proposal
                        self._count_refused(S.ERR_DUPLICATE_RECEIPT)
                        await fs.send_error(S.ERR_DUPLICATE_RECEIPT, "one receipt per session: this "
                                            "session's proposal was already answered")
                        return
                    async with sess.lock:  # a relayed step still computing is counted first
                        req = sess.req
                        work = SessionWork(self._receipts.peer_id if self._receipts else "", fs.peer_id,
                                           req.model_id, req.start, req.end, sess.sid, sess.opened_at,
                                           sess.tokens, self._flops_per_token_block)
                    await self._receipt(fs, env.body, work)
                else:  # session_close
                    await fs.send("session_closed", {}, timeout=self.config.send_timeout_s)
        except RemoteProtocolError as e:
            self.stats.bad_requests += 1
            log.info("session %d from %s: %s", sess.sid if sess else 0, fs.peer_id[-8:], e)
            await fs.send_error(S.ERR_BAD_REQUEST, str(e))
        except NetworkError as e:
            log.info("session %d from %s: link lost: %s", sess.sid if sess else 0, fs.peer_id[-8:], e)
        finally:
            if sess is not None:
                self._end(sess)

    def _end(self, sess: _Session) -> None:
        """Free a session's reservation and bookkeeping (its stream is done)."""
        fs, sid, req = sess.fs, sess.sid, sess.req
        sess.closing = True
        self._open.pop(sid, None)
        self._batcher.forget(sess.cache)
        self._peer_of.pop(sid, None)
        if fs.peer_id not in self._peer_of.values():
            limiter = self._inflight.get(fs.peer_id)
            if limiter is not None and limiter.borrowed_tokens == 0:
                del self._inflight[fs.peer_id]
        self.stats.bytes_sent += fs.bytes_sent
        self.stats.bytes_received += fs.bytes_received
        if self._reserved.pop(sid, None) is not None:
            log.info("session %d closed", sid)
            self._on_event("session_closed", session=sid, client=fs.peer_id, steps=sess.steps,
                           tokens=sess.tokens, busy_s=round(sess.busy, 4), blocks=[req.start, req.end])
        if not self._reserved:
            self._idle.set()

    def _count_refused(self, code: str) -> None:
        self.stats.receipts_refused[code] = self.stats.receipts_refused.get(code, 0) + 1

    async def _receipt(self, fs: FramedStream, body: dict[str, Any], work: SessionWork) -> None:
        """Answer a receipt proposal: check it against ``work``, countersign, commit it to the
        ledger, then reply with it. A refusal is an ``error`` (the session stays, closing)."""
        desk = self._receipts
        if desk is None or desk.ledger is None:
            self._count_refused(S.ERR_NO_RECEIPTS)
            await fs.send_error(S.ERR_NO_RECEIPTS, "this node keeps no ledger and signs no receipts")
            return
        try:
            receipt, client_sig = check_proposal(body, work, time.time())
        except ReceiptRefused as e:
            self._count_refused(e.code)
            log.info("session %d from %s: receipt refused: %s", work.session, fs.peer_id[-8:], e)
            await fs.send_error(e.code, str(e))
            return
        raw = receipt.encode(receipt.sign(desk.key), client_sig)
        try:  # committed (fsync) before we acknowledge it; off the event loop
            await trio.to_thread.run_sync(desk.ledger.add, raw, "server")
        except DuplicateReceipt as e:
            self._count_refused(S.ERR_DUPLICATE_RECEIPT)
            await fs.send_error(S.ERR_DUPLICATE_RECEIPT, str(e))
            return
        except sqlite3.Error as e:  # a full or broken disk: our problem, not the client's
            log.error("ledger %s: cannot store a receipt: %s", desk.ledger.path, e)
            self._count_refused(S.ERR_NO_RECEIPTS)
            await fs.send_error(S.ERR_NO_RECEIPTS, "this node cannot store receipts now")
            return
        self.stats.receipts += 1
        self._on_event("receipt", session=work.session, client=fs.peer_id, tokens=receipt.tokens,
                       verified=receipt.verified, unverified=receipt.unverified, rejected=receipt.rejected)
        await fs.send("receipt", {"receipt": raw}, timeout=self.config.send_timeout_s)

    async def _step(self, sess: _Session, body: dict[str, Any]) -> int:
        """Serve one step from the session's client; returns the number of positions computed (0
        if refused). A chained step's failures are ``chain_failed`` (the client is not waiting on
        this stream for them), a plain step's are ``error`` replies."""
        fs = sess.fs
        try:
            step = S.Step.from_body(body)
            hidden = decode_hidden(step.hidden, self._limits)
        except RemoteProtocolError as e:  # the session survives a bad step
            self.stats.bad_requests += 1
            await fs.send_error(S.ERR_BAD_TENSOR if isinstance(e, TensorError) else S.ERR_BAD_REQUEST,
                                str(e))
            return 0
        sess.fence = max(sess.fence, step.fence)
        if step.chain and self._relay is None:
            self.stats.bad_requests += 1
            await self._chain_failed(sess, step.seq, step.position,
                                     "this server does not forward chained steps")
            return 0
        problem = self._position_problem(sess, step.position, hidden.shape[0])
        if problem is not None:
            self.stats.bad_requests += 1
            if step.chain:
                await self._chain_failed(sess, step.seq, step.position, problem)
            else:
                await fs.send_error(S.ERR_BAD_POSITION, problem)
            return 0
        started = time.perf_counter()
        async with sess.lock:
            if step.chain:
                sess.last_seq = max(sess.last_seq, step.seq)
            ahead = max(0, min(sess.cache.length, step.position + hidden.shape[0]) - step.position)
            out = await self._compute(sess, hidden, step.position, step.hidden)
        if isinstance(out, _Refused):
            await self._refuse_output(sess, step.seq if step.chain else None, step.position, out)
            return 0
        encoded, sig, draining = out
        if not step.chain:
            result = S.StepResult(step.position, encoded, draining, sig, ahead)
            await fs.send("step_result", result.to_body(), timeout=self.config.send_timeout_s)
        else:
            assert sig is not None  # a relaying server has a key (BlockHosting)
            entry = S.TrailEntry(encoded, sig, draining, round(1e3 * (time.perf_counter() - started), 3))
            await self._pass_on(sess, step.seq, step.position, step.chain, (entry,))
        return int(hidden.shape[0])

    async def relay_step(self, rs: S.RelayStep) -> str | None:
        """Serve a chained step relayed by the hop before us (``RELAY_PROTOCOL``). Returns why it
        was dropped without a word (unknown session, wrong token, a step the client gave up on),
        else None: the session's client hears of any other failure (``chain_failed``)."""
        sess = self._open.get(rs.session)
        if sess is None or not hmac.compare_digest(sess.relay, rs.relay):
            return "unknown session or relay token"
        if rs.seq <= max(sess.fence, sess.last_seq):
            return "stale"  # the client fell back to plain steps, or a duplicate
        if sess.closing:
            await self._chain_failed(sess, rs.seq, rs.position, "session closing")
            return None
        started = time.perf_counter()
        try:
            if rs.hidden.dtype != sess.req.dtype:
                raise RemoteTensorError(f"dtype {rs.hidden.dtype}, session dtype {sess.req.dtype}")
            hidden = decode_hidden(rs.hidden, self._limits)
        except RemoteProtocolError as e:
            self.stats.bad_requests += 1
            await self._chain_failed(sess, rs.seq, rs.position, f"relayed input: {e}")
            return None
        async with sess.lock:
            if sess.closing or rs.seq <= max(sess.fence, sess.last_seq):
                return "stale"  # fenced (or closed) while it waited for the lock
            problem = self._position_problem(sess, rs.position, hidden.shape[0])
            if problem is None:
                sess.last_seq = rs.seq
                sess.valid_at = trio.current_time()
                out = await self._compute(sess, hidden, rs.position, rs.hidden)
        if problem is not None:
            self.stats.bad_requests += 1
            await self._chain_failed(sess, rs.seq, rs.position, problem)
            return None
        if isinstance(out, _Refused):
            await self._refuse_output(sess, rs.seq, rs.position, out)
            return None
        encoded, sig, draining = out
        assert sig is not None  # a relaying server has a key
        entry = S.TrailEntry(encoded, sig, draining, round(1e3 * (time.perf_counter() - started), 3))
        trail = (*rs.trail, entry)
        if rs.chain:
            await self._pass_on(sess, rs.seq, rs.position, rs.chain, trail)
        else:  # the last hop: every hop's output to the client
            with contextlib.suppress(NetworkError):
                await sess.fs.send("chain_result", S.ChainResult(rs.position, rs.seq, trail).to_body(),
                                   timeout=self.config.send_timeout_s)
        return None

    async def _pass_on(self, sess: _Session, seq: int, position: int, chain: tuple[S.ChainHop, ...],
                       trail: tuple[S.TrailEntry, ...]) -> None:
        nxt = chain[0]
        assert self._relay is not None  # only chained steps get here, and only when we relay
        body = S.RelayStep(nxt.session, nxt.relay, position, seq, chain[1:], trail).to_body()
        try:
            await self._relay(nxt.peer, body)
            self.stats.relayed += 1
        except NetworkError as e:
            await self._chain_failed(sess, seq, position, f"cannot forward to {nxt.peer[-8:]}: {e}")

    async def _chain_failed(self, sess: _Session, seq: int, position: int, why: str) -> None:
        self.stats.chain_failed += 1
        log.info("session %d: chained step %d at %d failed: %s", sess.sid, seq, position, why)
        with contextlib.suppress(NetworkError):
            await sess.fs.send("chain_failed", {"position": position, "seq": seq, "message": why[:500]},
                               timeout=2.0)

    async def _refuse_output(self, sess: _Session, seq: int | None, position: int,
                             refused: _Refused) -> None:
        # The input's sender caused it (see _compute), so refuse the step (the session survives)
        # instead of dying.
        self.stats.bad_requests += 1
        if seq is None:
            await sess.fs.send_error(refused.code, refused.why)
        else:
            await self._chain_failed(sess, seq, position, refused.why)

    def _position_problem(self, sess: _Session, position: int, rows: int) -> str | None:
        if position > sess.cache.length or position + rows > sess.req.max_length:
            return (f"position {position} (+{rows}) with {sess.cache.length} cached, "
                    f"max_length {sess.req.max_length}")
        return None

    async def _compute(self, sess: _Session, hidden: np.ndarray, position: int, sent: EncodedTensor
                       ) -> tuple[EncodedTensor, bytes | None, bool] | _Refused:
        """Compute ``hidden`` (decoded from ``sent``, as it travelled) at ``position`` through the
        session's blocks (call with its lock held); count it; return the encoded output, the
        signature over the step's commitment and the draining flag, or why the step is refused
        (the stage refuses it, or its output cannot be encoded)."""
        peer = sess.fs.peer_id
        limiter = self._inflight.get(peer)
        if limiter is None:
            limiter = self._inflight[peer] = trio.CapacityLimiter(self.config.max_inflight_per_peer)
        started = time.perf_counter()
        await acquire(limiter)  # one peer's many sessions queue here, not ahead of everyone else
        try:
            parts, done = [], 0
            while done < hidden.shape[0]:  # chunks: other sessions' steps run in between
                n = self._chunk_tokens(position + done, hidden.shape[0] - done)
                # Computed together with other sessions' steps that arrive within the batch window.
                parts.append(await self._batcher.forward(sess.stage, hidden[done:done + n], sess.cache,
                                                         position + done, peer))
                done += n
                self.stats.chunks += 1
        except ModelInputError as e:
            # The step passed _position_problem and the tensor limits, so this should not happen;
            # if a check is missing, the stage refuses this peer's input: its fault, not the node's.
            log.warning("session %d: the stage refused a checked step: %s", sess.sid, e)
            return _Refused(S.ERR_BAD_POSITION, f"the stage refused the step: {e}")
        finally:
            limiter.release()
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if self.fault is not None:
            out = self.fault.apply(hidden, out)
        took = time.perf_counter() - started
        self.stats.step_latency.observe(took)
        self.stats.steps += 1
        self.stats.tokens += hidden.shape[0]
        sess.busy += took
        try:
            encoded = encode_hidden(out, sess.req.dtype)
        except LocalProtocolError:  # finite but extreme inputs can overflow inside the blocks
            return _Refused(S.ERR_BAD_TENSOR, "step output is not encodable; input out of range")
        sess.steps += 1
        sess.tokens += int(hidden.shape[0])
        draining = self._gate().move_on
        sig = None
        if self._key is not None and self.peer_id is not None:
            req = sess.req
            commitment = StepCommitment(self.peer_id, peer, req.model_id, req.start, req.end, sess.sid,
                                        position, int(hidden.shape[0]),
                                        rows_root(row_digests(sent)),
                                        rows_root(row_digests(encoded)))
            sig = commitment.sign(self._key)
        return encoded, sig, draining
