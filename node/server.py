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
import itertools
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.batcher import StepBatcher, acquire
from idlefleet.node.faults import FaultInjector
from idlefleet.node.ledger import DuplicateReceipt, ReceiptDesk
from idlefleet.node.metrics import LatencyHistogram
from idlefleet.node.model.kvcache import KVCache
from idlefleet.node.model.stage import Stage
from idlefleet.p2p.errors import DeadlineExceeded, NetworkError, StreamClosed
from idlefleet.p2p.framing import FramedStream
from idlefleet.protocols import session as S
from idlefleet.protocols.errors import LocalProtocolError, RemoteProtocolError, TensorError
from idlefleet.protocols.peerid import peer_id_from_public_key
from idlefleet.protocols.receipts import ReceiptRefused, SessionWork, check_proposal, flops_per_token_block
from idlefleet.protocols.tensors import TensorLimits, decode_hidden, encode_hidden
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
    # generations leave its LM head together: node/batcher.py). On a loaded 2-core machine they
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


class StageServer:
    """Serves ``stage`` (blocks ``[stage.start, stage.end)``) on ``protocols.session.STAGE_PROTOCOL``."""

    def __init__(self, stage: Stage, config: ServerConfig = ServerConfig(),
                 limiter: trio.CapacityLimiter | None = None,
                 on_event: Callable[..., None] | None = None,
                 gate: Callable[[], str | None] | None = None,
                 receipts: ReceiptDesk | None = None,
                 key: Ed25519PrivateKey | None = None,
                 fault: FaultInjector | None = None) -> None:
        self.stage = stage
        self._receipts = receipts  # key + ledger: countersign and store receipts (None: refuse)
        self._key = key
        self.peer_id = peer_id_from_public_key(key.public_key().public_bytes_raw()) if key else None
        # Test tooling (--chaos-fault): every step's output goes through fault.apply(x, y) before
        # it is committed and sent, so a faulty server signs its wrong output as a cheat would.
        self.fault = fault
        # The owner policy: None while this node may serve, else why not (no new sessions then).
        self._gate = gate or (lambda: None)
        self._sessions: set[trio.CancelScope] = set()
        self._on_event = on_event or (lambda event, **fields: None)  # the owner's audit log
        self.config = config
        self.draining = False
        self.stats = ServerStatistics()
        self._limiter = limiter or trio.CapacityLimiter(1)
        self._batcher = StepBatcher(self._limiter, lambda: self.active_sessions,
                                    window_s=config.batch_window_s,
                                    lockstep_s=config.lockstep_window_s,
                                    max_batch_tokens=config.max_step_tokens,
                                    inline_rows=config.inline_rows, on_batch=self._on_batch)
        self._ids = _SESSION_IDS
        self._reserved: dict[int, int] = {}  # session id -> reserved KV bytes
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
    def active_sessions(self) -> int:
        return len(self._reserved)

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
        if self.draining:
            return self._refuse(S.ERR_DRAINING), "this node is draining; use another peer"
        why = self._gate()
        if why is not None:
            return self._refuse(S.ERR_DRAINING), f"not serving (owner policy: {why}); use another peer"
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
        sid = steps = tokens = invalid = 0
        busy = 0.0
        cache: KVCache | None = None
        stage: Stage | None = None
        req: S.OpenRequest | None = None
        opened_at = 0.0  # wall clock, for the receipt
        valid_at = trio.current_time()  # the idle timeout runs from the last valid message
        try:
            while machine.state is not S.SessionState.CLOSED:
                try:
                    left = valid_at + self.config.idle_timeout_s - trio.current_time()
                    env = await fs.receive(timeout=max(0.001, left))
                except StreamClosed:
                    return
                except DeadlineExceeded:
                    self.stats.idle_closed += 1
                    await fs.send_error(S.ERR_IDLE, f"no message for {self.config.idle_timeout_s}s")
                    return
                state = machine.receive(env.kind)
                if env.kind == "session_open":
                    req = S.OpenRequest.from_body(env.body)
                    refusal = self._admit(req, fs.peer_id)
                    if refusal is not None:
                        machine.fail_open()
                        await fs.send_error(*refusal)
                        continue
                    sid, opened_at = next(self._ids), time.time()
                    self._reserved[sid] = req.max_length * self._kv_bytes_per_pos
                    self._peer_of[sid] = fs.peer_id
                    valid_at = trio.current_time()
                    self._idle = trio.Event() if len(self._reserved) == 1 else self._idle
                    stage = self.stage.sub_stage(req.start, req.end)  # shares the weights
                    cache = stage.new_cache(capacity=min(64, req.max_length))
                    self.stats.sessions_opened += 1
                    log.info("session %d opened by %s: blocks [%d, %d), max_length %d", sid,
                             fs.peer_id[-8:], req.start, req.end, req.max_length)
                    self._on_event("session_opened", session=sid, client=fs.peer_id,
                                   blocks=[req.start, req.end], max_length=req.max_length)

                    await fs.send("session_opened", {"session": sid, "start": req.start, "end": req.end,
                                                     "hidden": stage.config.hidden_size},
                                  timeout=self.config.send_timeout_s)
                elif env.kind == "step":
                    # The state machine guarantees an opened session here.
                    assert stage is not None
                    assert cache is not None
                    assert req is not None
                    started = time.perf_counter()
                    done = await self._step(fs, env.body, stage, cache, req, sid)
                    busy += time.perf_counter() - started
                    steps, tokens = steps + (done > 0), tokens + done
                    if done:
                        invalid, valid_at = 0, trio.current_time()
                    else:
                        invalid += 1
                        if invalid >= self.config.max_invalid_steps:
                            self.stats.invalid_closed += 1
                            log.info("session %d from %s: %d invalid steps in a row; closed", sid,
                                     fs.peer_id[-8:], invalid)
                            return
                elif env.kind == "receipt_proposal":
                    assert req is not None  # the state machine guarantees an opened session
                    if state is S.SessionState.CLOSED:  # a second proposal
                        self._count_refused(S.ERR_DUPLICATE_RECEIPT)
                        await fs.send_error(S.ERR_DUPLICATE_RECEIPT, "one receipt per session: this "
                                            "session's proposal was already answered")
                        return
                    work = SessionWork(self._receipts.peer_id if self._receipts else "", fs.peer_id,
                                       req.model_id, req.start, req.end, sid, opened_at, tokens,
                                       self._flops_per_token_block)
                    await self._receipt(fs, env.body, work)
                else:  # session_close
                    await fs.send("session_closed", {}, timeout=self.config.send_timeout_s)
        except RemoteProtocolError as e:
            self.stats.bad_requests += 1
            log.info("session %d from %s: %s", sid, fs.peer_id[-8:], e)
            await fs.send_error(S.ERR_BAD_REQUEST, str(e))
        except NetworkError as e:
            log.info("session %d from %s: link lost: %s", sid, fs.peer_id[-8:], e)
        finally:
            if cache is not None:
                self._batcher.forget(cache)
            self._peer_of.pop(sid, None)
            if fs.peer_id not in self._peer_of.values():
                limiter = self._inflight.get(fs.peer_id)
                if limiter is not None and limiter.borrowed_tokens == 0:
                    del self._inflight[fs.peer_id]
            self.stats.bytes_sent += fs.bytes_sent
            self.stats.bytes_received += fs.bytes_received
            if self._reserved.pop(sid, None) is not None:
                log.info("session %d closed", sid)
                self._on_event("session_closed", session=sid, client=fs.peer_id,
                               steps=steps, tokens=tokens, busy_s=round(busy, 4),
                               blocks=[req.start, req.end] if req is not None else None)
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

    async def _step(self, fs: FramedStream, body: dict[str, Any], stage: Stage, cache: KVCache,
                    req: S.OpenRequest, sid: int) -> int:
        """Serve one step; returns the number of positions computed (0 if refused)."""
        try:
            step = S.Step.from_body(body)
            hidden = decode_hidden(step.hidden, self._limits)
        except RemoteProtocolError as e:  # the session survives a bad step
            self.stats.bad_requests += 1
            await fs.send_error(S.ERR_BAD_TENSOR if isinstance(e, TensorError) else S.ERR_BAD_REQUEST,
                                str(e))
            return 0
        if step.position > cache.length or step.position + hidden.shape[0] > req.max_length:
            self.stats.bad_requests += 1
            await fs.send_error(S.ERR_BAD_POSITION, f"position {step.position} (+{hidden.shape[0]}) "
                                f"with {cache.length} cached, max_length {req.max_length}")
            return 0
        limiter = self._inflight.get(fs.peer_id)
        if limiter is None:
            limiter = self._inflight[fs.peer_id] = trio.CapacityLimiter(self.config.max_inflight_per_peer)
        started = time.perf_counter()
        await acquire(limiter)  # one peer's many sessions queue here, not ahead of everyone else
        try:
            parts, done = [], 0
            while done < hidden.shape[0]:  # chunks: other sessions' steps run in between
                n = self._chunk_tokens(step.position + done, hidden.shape[0] - done)
                # Computed together with other sessions' steps that arrive within the batch window.
                parts.append(await self._batcher.forward(stage, hidden[done:done + n], cache,
                                                         step.position + done, fs.peer_id))
                done += n
                self.stats.chunks += 1
        finally:
            limiter.release()
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if self.fault is not None:
            out = self.fault.apply(hidden, out)
        self.stats.step_latency.observe(time.perf_counter() - started)
        self.stats.steps += 1
        self.stats.tokens += hidden.shape[0]
        try:
            encoded = encode_hidden(out, req.dtype)
        except LocalProtocolError as e:
            # Finite but extreme inputs can overflow inside the blocks (inf/NaN out): the client's
            # values caused it, so refuse the step (the session survives) instead of dying.
            self.stats.bad_requests += 1
            await fs.send_error(S.ERR_BAD_TENSOR, f"step output is not encodable ({e}); input out of range")
            return 0
        draining = self.draining or self._gate() is not None
        sig = None
        if self._key is not None and self.peer_id is not None:
            commitment = StepCommitment(self.peer_id, fs.peer_id, req.model_id, req.start, req.end, sid,
                                        step.position, int(hidden.shape[0]),
                                        rows_root(row_digests(step.hidden)), rows_root(row_digests(encoded)))
            sig = commitment.sign(self._key)
        result = S.StepResult(step.position, encoded, draining, sig)
        await fs.send("step_result", result.to_body(), timeout=self.config.send_timeout_s)
        return int(hidden.shape[0])
