"""The fleet client: keeps the embedding and LM head, streams hidden states through remote stages.

Token ids and text stay in this process: only hidden states travel, over Noise-encrypted libp2p
streams (what those reveal to each hop: README "Privacy"; ``ClientConfig.local_blocks`` keeps the
first blocks here so the first hop does not receive token embeddings). A generation opens one
pipeline session per hop of a route (``protocols.routing``) and steps it token by token. When a
hop dies (SIGKILL), goes silent (SIGSTOP: its step deadline expires), refuses or sends a bad reply
(another dtype, non-finite or out-of-range values), the peer is banned for a while, only that
hop's span is re-routed, and the span's past inputs are replayed to rebuild the KV cache on the
replacement; the tokens are the same as an undisturbed run. A hop that says it is draining is
moved the same way, without an error. Every hop session that computed something ends with a
receipt exchange (``Pipeline._exchange_receipt``): closed normally, moved, or abandoned after a
failure (then in the background, bounded); the double-signed receipt, or the server's refusal,
goes to the node's ledger. Our own mistakes (an invalid ``ClientConfig``, a prompt
longer than the context) are raised as local errors before any peer is contacted.

Embedding API::

    async with open_node(config) as node:
        client = await FleetClient.create(node)
        result = await client.generate("The capital of France is", max_new_tokens=16)
        print(result.text, result.route)
        async for token_id, piece in client.stream("Once upon a time,"):
            print(piece, end="")
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Hashable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from idlefleet.node.client.verifier import Verifier
from idlefleet.node.model.batcher import HeadBatcher
from idlefleet.node.model.generate import Generation
from idlefleet.node.model.gguf_loader import open_model
from idlefleet.node.model.locate import find_default_model
from idlefleet.node.model.sampling import SamplingParams
from idlefleet.node.model.stage import Head, Stage, load_head, load_stage
from idlefleet.node.model.tokenizer import TextStream, Tokenizer
from idlefleet.node.owner.ledger import ReceiptDesk
from idlefleet.node.runtime.node import Node
from idlefleet.p2p.errors import DeadlineExceeded, NetworkError, RemoteError
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.loopback import loopback_pair
from idlefleet.protocols import session as S
from idlefleet.protocols import wire
from idlefleet.protocols.errors import (
    ConfigError,
    IdlefleetError,
    LocalProtocolError,
    RemoteProtocolError,
)
from idlefleet.protocols.receipts import (
    Receipt,
    WorkTally,
    check_countersigned,
    flops_per_token_block,
    propose,
)
from idlefleet.protocols.routing import (
    Candidate,
    Hop,
    NoRoute,
    RouteCosts,
    exclusion,
    find_route,
    mark_accused,
)
from idlefleet.protocols.tensors import WIRE_DTYPES, EncodedTensor, TensorLimits, decode_hidden, encode_hidden
from idlefleet.protocols.verification import StepCommitment, TrustBook, row_digests, rows_root

log = logging.getLogger(__name__)


LOCKSTEP_SHARE = 0.25  # of a generation's time per token, the most its head row waits for others


def own_sessions_load(sessions: int) -> float:
    """The load that ``sessions`` of our own open on a peer add in route costs: 0.45 for one
    (its route costs ~1.8x), rising with every further one (0.6, 0.68, 0.72, ...) and never
    reaching 0.9, so concurrent generations spread evenly over equal hosts however many there are
    (a flat 0.5 per session capped at 0.9 made hosts with 2 and with 6 sessions look alike)."""
    return 0.9 * sessions / (sessions + 1)


class GenerationFailed(IdlefleetError):
    """The fleet could not finish the generation (no route left after failovers)."""


# A reply's hidden values beyond this are a bad reply (SmolLM2's largest activations are ~2.5e4);
# far below where the next RMSNorm overflows float32 (~7e17) and turns every logit into NaN.
MAX_HIDDEN_ABS = 1e6

# The whole receipt exchange of one hop (proposal, countersigned reply, our ledger commit).
RECEIPT_TIMEOUT_S = 2.0
REFUSAL_PAUSE_S = 5.0  # a peer that refused a session (busy, draining) is avoided this long
# Chaining (ClientConfig.chain): how long a chained step's result is waited for before the client
# redoes the step hop by hop: CHAIN_WAIT_FACTOR x the recent chained step time, at least
# CHAIN_MIN_WAIT_S (a hop that died mid-chain costs this, not the full step deadline), and how
# many steps go hop by hop after a chained step failed before chaining is tried again.
CHAIN_MIN_WAIT_S = 1.0
CHAIN_WAIT_FACTOR = 4.0
CHAIN_RETRY_AFTER = 16
STALE_REPLIES = 8  # unasked chain_result / chain_failed frames skipped before a step's reply
# The trust book in the data directory (FleetClient.save_trust): saved at most this often while
# generations run, and read only up to this size (4096 peers take ~330 KB).
TRUST_SAVE_S = 10.0
MAX_TRUST_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class ClientConfig:
    wire_dtype: str = "float32"  # hidden states on the wire: float32 (exact), float16, int8
    open_timeout_s: float = 5.0
    step_timeout_s: float = 3.0  # a step's deadline: this plus step_timeout_per_token_block_s ...
    step_timeout_per_token_block_s: float = 0.002  # ... x tokens x blocks of the hop
    ban_s: float = 60.0  # how long a failed peer is avoided
    max_failovers: int = 8  # per generation
    route_wait_s: float = 30.0  # how long to wait for the fleet to cover every block
    dht_lookup_after_s: float = 1.0  # gossip first; then look uncovered blocks up in the DHT ...
    dht_lookup_every_s: float = 5.0  # ... this often while they stay uncovered
    # Privacy by routing: every hop's region must start with one of these geohash prefixes
    # (empty: anywhere). No route ever violates it; when none exists, NoRoute says so.
    allow_regions: tuple[str, ...] = ()
    # Decoding one token through one SmolLM2 block in numpy takes ~1 ms, far more than its FLOPs
    # at a node's measured matmul rate suggest (it is memory-bound): count that as overhead, so
    # compute, not RTT noise, dominates route costs.
    costs: RouteCosts = field(default_factory=lambda: RouteCosts(block_overhead_s=0.001))
    # Run blocks [0, local_blocks) in this process: the first hop then sees hidden states after
    # that many blocks instead of token embeddings (README "Privacy"); routing covers the rest.
    local_blocks: int = 0
    max_hidden_abs: float = MAX_HIDDEN_ABS
    # Verified work (node/client/verifier.py): re-compute remote hops' windows of ``verify_window``
    # positions on an independent host; a new peer's hop sessions are all checked, a trusted
    # peer's are sampled (each whole session or none of it) with a falling probability, never
    # below ``verify_min_rate``. ``verify_strict``: a generation's tokens (its result and its
    # stream) are only verified work (every session checked); else the stream is not held back
    # and the tokens of sessions that were not sampled stay unverified.
    verify: bool = True
    verify_window: int = 16
    verify_min_rate: float = 0.1
    verify_strict: bool = False
    verify_flush_s: float = 30.0  # how long the end of a generation waits for its checks
    # Where the trust book is kept across runs (FleetClient.save_trust); default: trust.json in
    # the node's data directory, if it has one (else it is not kept).
    trust_file: Path | None = None
    # No third host to referee a mismatch: recompute the disputed row here, from the model file
    # (loads that hop's blocks for the moment; off on a client too small to hold them).
    verify_local_referee: bool = True
    # Concurrent generations of one client decode in step (node/model/batcher.py HeadBatcher): a
    # token's LM head row waits up to this long for the other decoding generations' rows, so
    # that all of them are computed together here and on every stage server. 0: no waiting.
    # A row never waits more than LOCKSTEP_SHARE of its own generation's recent time per token:
    # a fast stream is not held to the pace of a slow one.
    lockstep_window_s: float = 0.05
    # Server-to-server chaining (docs/PROTOCOL.md 5.4): a decode step travels client -> A -> B
    # -> C -> client (4 messages instead of 6, and no client work between hops) when every
    # remote hop offers it; each hop's output and signature still reach the client (verified
    # work is unchanged). Prefill, replay and failover go hop by hop.
    chain: bool = True
    # The head's lockstep is per route ("waves", node/model/batcher.py HeadBatcher): concurrent
    # generations on different routes do not wait for each other, so the client computes one
    # wave's LM head while the stage servers compute another's steps. False: one lockstep for all.
    waves: bool = True

    def __post_init__(self) -> None:
        """Raises ConfigError for an invalid setting: a local error, never blamed on a peer."""
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        for name in ("open_timeout_s", "step_timeout_s", "ban_s", "route_wait_s", "max_hidden_abs"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        value = self.step_timeout_per_token_block_s
        if type(value) not in (int, float) or not 0 <= value < math.inf:
            raise ConfigError(f"step_timeout_per_token_block_s must be a number >= 0, got {value!r}")
        for name in ("max_failovers", "local_blocks"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if type(self.verify_window) is not int or not 1 <= self.verify_window <= 4096:
            raise ConfigError(f"verify_window must be an integer in 1..4096, got {self.verify_window!r}")
        value = self.verify_min_rate
        if type(value) not in (int, float) or not 0 < value <= 1:
            raise ConfigError(f"verify_min_rate must be in (0, 1], got {value!r}")
        value = self.verify_flush_s
        if type(value) not in (int, float) or not 0 < value < math.inf:
            raise ConfigError(f"verify_flush_s must be a positive number, got {value!r}")
        if self.trust_file is not None and not isinstance(self.trust_file, Path):
            raise ConfigError(f"trust_file must be a pathlib.Path, got {self.trust_file!r}")
        value = self.lockstep_window_s
        if type(value) not in (int, float) or not 0 <= value <= 1:
            raise ConfigError(f"lockstep_window_s must be a number of seconds in [0, 1], got {value!r}")


@dataclass(frozen=True)
class ClientModel:
    """What the client holds: tokenizer, embedding + LM head, and the model's identity."""

    model_id: str
    n_blocks: int
    tokenizer: Tokenizer
    head: Head
    local: Stage | None = None  # blocks [0, K) run here (ClientConfig.local_blocks), or None
    path: Path | None = None  # the model file (the verifier's last-resort referee loads blocks from it)

    @property
    def local_blocks(self) -> int:
        return 0 if self.local is None else self.local.end

    @classmethod
    def load(cls, path: str | Path | None = None, *, local_blocks: int = 0) -> ClientModel:
        """Raises ConfigError if ``local_blocks`` is not in ``[0, n_blocks)``."""
        file = Path(path or find_default_model())
        with open_model(file) as mf:
            n = mf.config.n_blocks
            if not 0 <= local_blocks < n:
                raise ConfigError(f"local_blocks must be in [0, {n}) for this model, got {local_blocks}")
            local = load_stage(mf, 0, local_blocks) if local_blocks else None
            return cls(mf.info().model_id, n, Tokenizer.from_model(mf), load_head(mf), local, file)


@dataclass(frozen=True)
class FleetResult:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    tokens_per_s: float
    route: list[dict[str, Any]]
    failovers: int
    stop_reason: str
    # windows_checked, sessions_shadowed, sessions_skipped, mismatches, banned_peers,
    # rolled_back_tokens, unverified_tokens, reports, undecided (node/client/verifier.py); None when
    # verification is off.
    verification: dict[str, Any] | None = None
    # Steps sent as one chained step through every hop, and chained steps that had to be redone
    # hop by hop (ClientConfig.chain).
    chained_steps: int = 0
    chain_failures: int = 0


class StageFailure(Exception):
    """One hop failed; ``ban`` says whether to avoid the peer for a while, ``unreachable`` that
    it was a session that could not be opened for a network error (a last resort, not a fault)."""

    def __init__(self, hop: _HopSession, why: str, *, ban: bool = True, unreachable: bool = False) -> None:
        super().__init__(f"{hop.peer_id[-8:]} [{hop.start}, {hop.end}): {why}")
        self.hop = hop
        self.ban = ban
        self.unreachable = unreachable


def _time_shares(hops: list[_HopSession], ms: list[float]) -> list[float]:
    """How a chained step's time is shared out among its hops, for their measured speeds: as the
    servers say they held it (``ms``, not signed: a hop could lie about itself or, relaying,
    about the others), but each hop's share kept within half and twice its share of the blocks."""
    blocks = [h.end - h.start for h in hops]
    fair = [b / sum(blocks) for b in blocks]
    ms = [min(1e9, max(0.0, m)) if math.isfinite(m) else 1e9 for m in ms]
    total = sum(ms)
    claimed = [m / total for m in ms] if total > 0 else fair
    bounded = [min(2 * f, max(0.5 * f, c)) for f, c in zip(fair, claimed, strict=True)]
    return [b / sum(bounded) for b in bounded]


class _ChainBroken(Exception):
    """A chained step did not come back whole (the caller redoes it hop by hop)."""


@dataclass
class _HopSession:
    peer_id: str
    start: int
    end: int
    stream: FramedStream | None = None
    inputs: list[np.ndarray] = field(default_factory=list)  # every input sent, in position order
    draining: bool = False
    counted: bool = False  # in the client's open_sessions
    tally: WorkTally = field(default_factory=WorkTally)  # this session's work, for its receipt
    opened_at: float = field(default_factory=time.time)
    session: int | None = None  # the server's session number (session_opened): step commitments, receipt
    check: Any = None  # the verifier's HopCheck for this hop (node/client/verifier.py), once it stepped
    relay: bytes | None = None  # the relay token of session_opened: this server takes chained steps
    chain_pending: int = 0  # rows of a chained step we gave up on, that this server may have computed
    failed: StageFailure | None = None  # a failure seen while waiting on a chain, raised at its next step

    @property
    def length(self) -> int:
        return sum(x.shape[0] for x in self.inputs)


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


class Pipeline:
    """The sessions of one generation: a chain of hops covering blocks ``[0, n)``, with failover."""

    def __init__(self, client: FleetClient, max_length: int) -> None:
        """Raises LocalProtocolError if our own session request would be invalid (a prompt longer
        than the context, a bad dtype): found before any peer is contacted, blamed on none."""
        self.client = client
        self.max_length = max_length
        self.start = client.model.local_blocks
        self.hops: list[_HopSession] = []
        # The route being opened (sessions not all open yet): concurrent generations that route
        # meanwhile follow it as they follow ``hops``.
        self.routing: list[Hop] = []
        self.failovers = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        context = client.model.head.config.context_length
        if max_length > context:
            raise LocalProtocolError(f"prompt plus max_new_tokens is {max_length} tokens; "
                                     f"the model's context is {context}")
        S.OpenRequest(client.model.model_id, self.start, client.model.n_blocks, max_length,
                      client.config.wire_dtype)  # LocalProtocolError: our own request is invalid
        self._local_cache = client.model.local.new_cache() if client.model.local is not None else None
        self.verifier = Verifier(self) if client.config.verify else None
        self.steps = 0  # forward calls
        self.chained = 0  # steps that went through a chain
        self.chain_failures = 0
        self._seq = 0  # the last chained step's number
        self._fence = 0  # plain steps tell servers to drop relayed steps numbered up to this
        self._chain_after = 0  # no chaining before step number this (counted from 1, as ``steps``)
        self._chain_s = 0.0  # EWMA of a chained step's time

    @property
    def wave(self) -> tuple[str, ...]:
        """The head's lockstep group of this generation (``HeadBatcher``): its route's peers."""
        return tuple(h.peer_id for h in self.hops)

    @property
    def route(self) -> list[dict[str, Any]]:
        return [{"peer_id": h.peer_id, "blocks": [h.start, h.end]} for h in self.hops]

    async def open(self) -> None:
        self.client.pipelines.add(self)  # its chain is one the client's next routes follow
        try:
            self.hops, _ = await self._open_span(self.start, self.client.model.n_blocks, [])
        finally:
            self.routing = []

    async def forward(self, hidden: np.ndarray, position: int) -> np.ndarray:
        """Run ``hidden`` (positions ``position..``) through the local blocks (if any), then every
        hop, failing over as needed."""
        x = hidden
        local = self.client.model.local
        if local is not None:
            assert self._local_cache is not None  # made with local
            x = await trio.to_thread.run_sync(local.forward, x, self._local_cache, position)
        self.steps += 1
        if self._chainable(x):
            out = await self._chain(x, position)
            if out is not None:
                i = 0
                while i < len(self.hops):  # a hop's server asked us to move its session
                    if self.hops[i].draining:
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
                if hop.draining:
                    replaced, _ = await self._move(i, "draining")
                    self.hops[i:i + 1] = replaced
                    i += len(replaced) - 1
            x = out
            i += 1
        return x

    async def aclose(self) -> None:
        self.client.pipelines.discard(self)
        if self.verifier is not None:
            await self.verifier.aclose()
        for hop in self.hops:
            self._release(hop)  # at once: the closes below may run out of time
        # Every hop at once: a client that goes away frees its sessions on all stage servers
        # within one round trip, not one per hop.
        with trio.CancelScope(shield=True), trio.move_on_after(RECEIPT_TIMEOUT_S + 1.0):
            async with trio.open_nursery() as nursery:
                for hop in self.hops:
                    nursery.start_soon(self._close, hop)

    # -- chaining ------------------------------------------------------------------------------
    def _chainable(self, x: np.ndarray) -> bool:
        me = self.client.node.peer_id
        return (self.client.config.chain and len(self.hops) >= 2 and self.steps >= self._chain_after
                and 0 < x.shape[0] <= S.CHAIN_MAX_ROWS
                and all(h.relay is not None and h.stream is not None and h.session is not None
                        and h.peer_id != me and not h.draining and h.failed is None for h in self.hops))

    async def _chain(self, x: np.ndarray, position: int) -> np.ndarray | None:
        """Send ``x`` through every hop as one chained step; the last hop returns every hop's
        output and signature. Returns the last output, or None when the chain failed (no ban:
        a broken chain does not show who broke it; the caller redoes the step hop by hop)."""
        hops, rows = list(self.hops), x.shape[0]
        first, last = hops[0], hops[-1]
        assert first.stream is not None  # _chainable
        assert last.stream is not None
        self._seq += 1
        seq = self._seq
        sent = encode_hidden(x, self.client.config.wire_dtype)
        # _chainable: every hop has its session number and relay token.
        chain = tuple(S.ChainHop(h.peer_id, h.session, h.relay) for h in hops[1:])  # type: ignore[arg-type]
        full = sum(self._deadline(h, rows) for h in hops)
        wait = min(full, max(CHAIN_MIN_WAIT_S, CHAIN_WAIT_FACTOR * self._chain_s)) if self._chain_s else full
        started = time.monotonic()
        try:
            before_s, before_r = first.stream.bytes_sent, last.stream.bytes_received
            await first.stream.send("step", S.Step(position, sent, chain, seq).to_body(), timeout=wait)
            result = await self._chain_reply(last, seq, wait)
            self.bytes_sent += first.stream.bytes_sent - before_s
            self.bytes_received += last.stream.bytes_received - before_r
            exchanges = self._check_chain(hops, result, x, sent, position)
        except (NetworkError, RemoteProtocolError, _ChainBroken) as e:
            self._broken(hops, seq, rows, f"{type(e).__name__}: {e}")
            return None
        took = time.monotonic() - started
        self._chain_s = took if not self._chain_s else 0.8 * self._chain_s + 0.2 * took
        self.chained += 1
        shares = _time_shares(hops, [e.ms for e in result.trail]) if rows == 1 else []
        for i, (hop, ex, entry) in enumerate(zip(hops, exchanges, result.trail, strict=True)):
            hop.inputs.append(ex.inputs)
            hop.tally.add(rows)
            hop.chain_pending = 0
            if entry.draining:
                if hop is last:  # its own entry, on its own stream: authentic
                    hop.draining = True
                else:  # another hop's flag could be forged on the way: ask that hop itself, with
                    self._chain_after = self.steps + 2  # the next step going hop by hop
            self.client.positions_computed[hop.peer_id] += rows
            if shares:  # decode steps only, as in _step
                self.client.record_step(hop.peer_id, took * shares[i], hop.end - hop.start)
            if self.verifier is not None:
                self.verifier.record(hop, ex)
        return exchanges[-1].out

    async def _chain_reply(self, last: _HopSession, seq: int, wait: float) -> S.ChainResult:
        """The ``chain_result`` numbered ``seq`` from the last hop's stream, skipping stale
        unasked frames. Raises _ChainBroken, NetworkError or RemoteProtocolError."""
        assert last.stream is not None
        deadline = trio.current_time() + wait
        for _ in range(STALE_REPLIES + 1):
            left = deadline - trio.current_time()
            if left <= 0:
                break
            try:
                env = await last.stream.receive_reply(timeout=left)
            except RemoteError as e:  # the last hop's session ended (owner stop, idle): its fault
                last.failed = StageFailure(last, f"chained step failed: {e}", ban=e.code != S.ERR_DRAINING)
                raise _ChainBroken(str(e)) from None
            if env.kind == "chain_failed":
                if env.body.get("seq") == seq:
                    raise _ChainBroken(f"{last.peer_id[-8:]}: {str(env.body.get('message', ''))[:200]}")
                continue
            if env.kind != "chain_result":
                raise RemoteProtocolError(f"expected chain_result, got {env.kind}")
            result = S.ChainResult.from_body(env.body)
            if result.seq == seq:
                return result
        raise _ChainBroken(f"no chain_result within {wait:.2f}s")

    def _check_chain(self, hops: list[_HopSession], result: S.ChainResult, x: np.ndarray,
                     sent: EncodedTensor, position: int) -> list[Exchange]:
        """Every hop's output and commitment, checked as a plain step's reply would be; raises
        _ChainBroken on any flaw (whoever relayed last may have tampered: no one is blamed)."""
        if result.position != position or len(result.trail) != len(hops):
            raise _ChainBroken(f"chain_result for position {result.position} with {len(result.trail)} "
                               f"entries, expected {position} with {len(hops)}")
        out: list[Exchange] = []
        inputs, enc = x, sent
        for hop, entry in zip(hops, result.trail, strict=True):
            try:
                rows = self._check_reply(S.StepResult(position, entry.hidden), position, x.shape)
                commitment = self._commitment(hop, enc, entry.hidden, position, x.shape[0])
                commitment.verify(entry.sig)
            except RemoteProtocolError as e:
                raise _ChainBroken(f"entry of {hop.peer_id[-8:]}: {e}") from None
            out.append(Exchange(position, inputs, enc, entry.hidden, rows, commitment, entry.sig))
            inputs, enc = rows, entry.hidden
        return out

    def _broken(self, hops: list[_HopSession], seq: int, rows: int, why: str) -> None:
        """A chained step failed: fence it off on every server (the next plain steps say so), go
        hop by hop for a while, and remember what the servers may have computed (receipts)."""
        log.info("chained step %d failed (%s); redoing it hop by hop", seq, why)
        self.chain_failures += 1
        self._fence = seq
        self._chain_after = self.steps + CHAIN_RETRY_AFTER
        for hop in hops:
            hop.chain_pending = rows

    # -- one hop -------------------------------------------------------------------------------
    def _deadline(self, hop: _HopSession, tokens: int) -> float:
        c = self.client.config
        return c.step_timeout_s + c.step_timeout_per_token_block_s * tokens * (hop.end - hop.start)

    async def _open_hop(self, hop: _HopSession) -> None:
        client = self.client
        req = S.OpenRequest(client.model.model_id, hop.start, hop.end, self.max_length,
                            client.config.wire_dtype)  # checked in __init__: cannot fail here
        try:
            if hop.peer_id == client.node.peer_id:
                hop.stream = client.open_own_stage()
            else:
                await client.ensure_connected(hop.peer_id)
                hop.stream = await client.node.host.open_stream(hop.peer_id, S.STAGE_PROTOCOL,
                                                                timeout=client.config.open_timeout_s)
            await hop.stream.send("session_open", req.to_body(), timeout=client.config.open_timeout_s)
            reply = await hop.stream.receive_reply(timeout=client.config.open_timeout_s)
            if reply.kind != "session_opened":
                raise RemoteProtocolError(f"expected session_opened, got {reply.kind}")
            hidden, session = reply.body.get("hidden"), reply.body.get("session")
            if type(session) is not int or not 0 <= session < 2**63:
                raise RemoteProtocolError(f"session_opened: bad session number {session!r}")
            hop.session = session
            relay = reply.body.get("relay")
            if relay is not None and not (isinstance(relay, bytes) and len(relay) == S.RELAY_TOKEN_LEN):
                raise RemoteProtocolError(f"session_opened: relay must be {S.RELAY_TOKEN_LEN} bytes")
            hop.relay = relay
            if hidden != client.model.head.config.hidden_size:
                raise RemoteProtocolError(f"session_opened says hidden size {hidden!r}, the model has "
                                          f"{client.model.head.config.hidden_size}")
            client.sessions_opened[hop.peer_id] += 1
        except RemoteError as e:
            # A refusal (busy, draining, wrong blocks) is not a fault: avoid the peer only briefly.
            raise StageFailure(hop, f"refused: {e}",
                               ban=e.code not in (S.ERR_BUSY, S.ERR_DRAINING)) from None
        except NetworkError as e:
            raise StageFailure(hop, f"open failed: {e}", unreachable=True) from None
        except RemoteProtocolError as e:
            raise StageFailure(hop, f"open failed: {e}") from None

    async def _step(self, hop: _HopSession, x: np.ndarray, position: int) -> np.ndarray:
        """Send one step to ``hop``; return its output. Raises StageFailure."""
        started = time.monotonic()
        ex = await self._exchange(hop, x, position)
        hop.tally.add(x.shape[0])
        self.client.positions_computed[hop.peer_id] += x.shape[0]
        if x.shape[0] == 1:  # decode steps only: comparable across peers and prompts
            self.client.record_step(hop.peer_id, time.monotonic() - started, hop.end - hop.start)
        if self.verifier is not None and ex.commitment is not None:
            self.verifier.record(hop, ex)
        return ex.out

    async def _exchange(self, hop: _HopSession, x: np.ndarray, position: int) -> Exchange:
        """Send one step to ``hop`` and check the reply, its signature included (the own-stage
        loopback hop needs none). Raises StageFailure."""
        if hop.failed is not None:
            failure, hop.failed = hop.failed, None
            raise failure
        if hop.stream is None:
            raise StageFailure(hop, "no session")
        sent = encode_hidden(x, self.client.config.wire_dtype)
        body = S.Step(position, sent, fence=self._fence).to_body()
        deadline = self._deadline(hop, x.shape[0])
        try:
            before_s, before_r = hop.stream.bytes_sent, hop.stream.bytes_received
            await hop.stream.send("step", body, timeout=deadline)
            reply = await self._reply(hop.stream, deadline)
            self.bytes_sent += hop.stream.bytes_sent - before_s
            self.bytes_received += hop.stream.bytes_received - before_r
            if reply.kind != "step_result":
                raise RemoteProtocolError(f"expected step_result, got {reply.kind}")
            result = S.StepResult.from_body(reply.body)
            out = self._check_reply(result, position, x.shape)
            if result.ahead and hop.chain_pending:  # it had computed the chained step we gave up on
                hop.tally.add(min(result.ahead, hop.chain_pending))
                self.client.positions_computed[hop.peer_id] += min(result.ahead, hop.chain_pending)
            hop.chain_pending = 0
            commitment = None if hop.peer_id == self.client.node.peer_id else self._check_sig(
                hop, result, sent, position, x.shape[0])
        except RemoteError as e:  # an owner's "stop" ends sessions with draining: not a fault
            raise StageFailure(hop, f"step at {position} failed: {e}",
                               ban=e.code != S.ERR_DRAINING) from None
        except (NetworkError, RemoteProtocolError) as e:
            raise StageFailure(hop, f"step at {position} failed: {e}") from None
        hop.draining = result.draining
        return Exchange(position, x, sent, result.hidden, out, commitment, result.sig)

    @staticmethod
    async def _reply(stream: FramedStream, timeout: float) -> wire.Envelope:
        """The next reply on ``stream``, skipping unasked chain frames of a chained step we gave
        up on (``chain_result``, ``chain_failed``)."""
        deadline = trio.current_time() + timeout
        for _ in range(STALE_REPLIES):
            reply = await stream.receive_reply(timeout=max(0.001, deadline - trio.current_time()))
            if reply.kind not in ("chain_result", "chain_failed"):
                return reply
        return await stream.receive_reply(timeout=max(0.001, deadline - trio.current_time()))

    def _check_sig(self, hop: _HopSession, result: S.StepResult, sent: EncodedTensor, position: int,
                   tokens: int) -> StepCommitment:
        """The commitment the server must have signed for this step, rebuilt from what we sent and
        received; RemoteProtocolError if the signature is missing or does not verify."""
        if result.sig is None:
            raise RemoteProtocolError("step_result carries no commitment signature")
        commitment = self._commitment(hop, sent, result.hidden, position, tokens)
        commitment.verify(result.sig)
        return commitment

    def _commitment(self, hop: _HopSession, sent: EncodedTensor, received: EncodedTensor, position: int,
                    tokens: int) -> StepCommitment:
        client = self.client
        assert hop.session is not None  # set when the session opened, before any step
        return StepCommitment(hop.peer_id, client.node.peer_id, client.model.model_id, hop.start,
                              hop.end, hop.session, position, tokens, rows_root(row_digests(sent)),
                              rows_root(row_digests(received)))

    def _check_reply(self, result: S.StepResult, position: int, shape: tuple[int, ...]) -> np.ndarray:
        """The reply's hidden states, or RemoteProtocolError (a bad reply from that peer): another
        dtype than the session's, another position or shape, NaN/inf, or values beyond
        ``max_hidden_abs`` (an int8 scale of 3e38 would otherwise turn every logit into NaN and
        the "generated" text into token 0)."""
        want = self.client.config.wire_dtype
        if result.hidden.dtype != want:
            raise RemoteProtocolError(f"step_result dtype {result.hidden.dtype}, session dtype {want}")
        with np.errstate(over="ignore", invalid="ignore"):
            out = decode_hidden(result.hidden, self.client.limits)
            peak = float(np.abs(out).max())
        if result.position != position or out.shape != shape:
            raise RemoteProtocolError(f"step_result for position {result.position} shape "
                                      f"{out.shape}, expected {position} {shape}")
        if not peak <= self.client.config.max_hidden_abs:  # NaN fails this too
            raise RemoteProtocolError(f"step_result values out of range (max |x| = {peak:.3g})")
        return out

    def _release(self, hop: _HopSession) -> None:
        if hop.counted:
            hop.counted = False
            self.client.open_sessions[hop.peer_id] -= 1

    async def _abandon(self, hop: _HopSession) -> None:
        """Drop a failed hop's session without waiting on a peer that may be frozen. Its receipt
        exchange is still attempted (a server caught by verification gets a receipt that says
        rejected), in the node's nursery within ``RECEIPT_TIMEOUT_S``, so failover does not wait."""
        self._release(hop)
        stream, hop.stream = hop.stream, None
        if stream is None:
            return
        if self._wants_receipt(hop):
            self.client.receipts_pending += 1  # counted now: the task starts later
            try:
                self.client.node.nursery.start_soon(self._settle_abandoned, hop, stream)
                return
            except RuntimeError:  # the node is stopping: no exchange
                self.client.receipts_pending -= 1
        with trio.move_on_after(0.2):
            await stream.reset()

    async def _settle_abandoned(self, hop: _HopSession, stream: FramedStream) -> None:
        try:
            await self._exchange_receipt(hop, stream)
        finally:
            self.client.receipts_pending -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(0.2):
                await stream.reset()

    async def _close(self, hop: _HopSession) -> None:
        self._release(hop)
        if hop.stream is None:
            return
        stream, hop.stream = hop.stream, None
        closed = False
        try:
            await self._exchange_receipt(hop, stream)
            await stream.send("session_close", {}, timeout=1.0)
            await stream.receive(timeout=1.0)
            closed = True
        except (NetworkError, RemoteProtocolError):
            pass
        finally:
            # Whatever happened (a late reply, no reply, our caller's deadline), the stream goes:
            # a stream left open would hold the session (and its KV budget) on the server until its
            # idle timeout, and this client's share of that server with it.
            with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                await (stream.aclose() if closed else stream.reset())

    # -- receipts ------------------------------------------------------------------------------
    def _wants_receipt(self, hop: _HopSession) -> bool:
        """A receipt is exchanged for a peer's session that computed something (not our own
        stage: a receipt needs two parties)."""
        desk = self.client.receipts
        return (desk is not None and hop.peer_id != desk.peer_id and hop.session is not None
                and hop.tally.tokens > 0)

    def _receipt_of(self, hop: _HopSession, client_id: str) -> Receipt:
        tally, blocks = hop.tally, hop.end - hop.start
        assert hop.session is not None  # _wants_receipt
        opened = float(hop.opened_at)
        return Receipt(server=hop.peer_id, client=client_id, model_id=self.client.model.model_id,
                       start=hop.start, end=hop.end, session=hop.session, opened_at=opened,
                       closed_at=max(opened, time.time()), tokens=tally.tokens,
                       block_steps=tally.tokens * blocks,
                       flops=self.client.flops_per_token_block * (tally.tokens * blocks),
                       verified=tally.verified, unverified=tally.unverified, rejected=tally.rejected)

    async def _exchange_receipt(self, hop: _HopSession, stream: FramedStream) -> None:
        """Propose ``hop``'s receipt (signed by us), check the server's countersigned reply and
        store it in our ledger; or record why not (the server's error code, ``no_reply``,
        ``link_lost``, ``bad_countersignature``). Bounded by ``RECEIPT_TIMEOUT_S``; never raises."""
        client, desk = self.client, self.client.receipts
        if desk is None or not self._wants_receipt(hop):
            return
        receipt = self._receipt_of(hop, desk.peer_id)
        body = propose(receipt, desk.key)
        reason = detail = ""
        with trio.move_on_after(RECEIPT_TIMEOUT_S) as scope:
            try:
                await stream.send("receipt_proposal", body, timeout=RECEIPT_TIMEOUT_S)
                reply = await self._reply(stream, RECEIPT_TIMEOUT_S)
                if reply.kind == "step_result":  # the late reply to a step we gave up on
                    reply = await self._reply(stream, RECEIPT_TIMEOUT_S)
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
                client.receipts_stored += 1
                if desk.ledger is not None:
                    await trio.to_thread.run_sync(desk.ledger.add, raw, "client")
                return
            client.receipts_refused[reason] += 1
            # A server that lied is worth a warning; a refusal, a dead link or no ledger is routine.
            (log.warning if reason == "bad_countersignature" else log.info)(
                "no receipt from %s for session %d: %s %s", hop.peer_id[-8:], receipt.session, reason, detail)
            if desk.ledger is not None:
                await trio.to_thread.run_sync(functools.partial(
                    desk.ledger.add_refused, hop.peer_id, receipt.session, reason, detail, wire.pack(body)))
        except (sqlite3.Error, OSError, IdlefleetError) as e:  # our own disk: never end a generation
            log.error("ledger: cannot record the receipt of session %d: %r", receipt.session, e)

    # -- routing and failover ------------------------------------------------------------------
    async def _open_span(self, start: int, end: int, history: list[np.ndarray],
                         pending: np.ndarray | None = None
                         ) -> tuple[list[_HopSession], np.ndarray | None]:
        """Route ``[start, end)``, open sessions, and replay ``history`` (+ ``pending``) through
        them. Returns the hops and the span's output for ``pending``."""
        client = self.client
        attempts = 0
        while True:
            attempts += 1
            try:
                route = client.find_route(start, end)
            except NoRoute as e:
                raise GenerationFailed(f"no route for blocks [{start}, {end}): {e}") from None
            hops = [_HopSession(h.peer_id, h.start, h.end, counted=True) for h in route]
            for hop in hops:  # counted at once: a concurrent generation routing now sees them
                client.open_sessions[hop.peer_id] += 1
            if not self.hops:  # the whole route (not a failover's span): followed from now on
                self.routing = route
            try:
                for hop in hops:
                    await self._open_hop(hop)
                return hops, await self._replay(hops, history, pending)
            except StageFailure as e:
                (log.warning if e.ban else log.info)("route %s failed%s: %s", [h.peer_id[-8:] for h in hops],
                                                     " (peer banned)" if e.ban else "", e)
                client.avoid(e.hop.peer_id, e.ban, unreachable=e.unreachable)
                for hop in hops:
                    await (self._abandon(hop) if hop is e.hop else self._close(hop))
                self.failovers += 1
                if attempts > client.config.max_failovers:
                    raise GenerationFailed(f"gave up on blocks [{start}, {end}) after "
                                           f"{attempts} attempts: {e}") from None

    async def _replay(self, hops: list[_HopSession], history: list[np.ndarray],
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
                         pending: np.ndarray) -> tuple[list[_HopSession], np.ndarray]:
        lost = self.hops[i]
        log.warning("hop failed, re-routing blocks [%d, %d): %s", lost.start, lost.end, failure)
        self.client.avoid(lost.peer_id, failure.ban)
        if self.verifier is not None:
            self.verifier.retire(lost)
        self.failovers += 1
        if self.failovers > self.client.config.max_failovers:
            raise GenerationFailed(f"too many failures; last: {failure}")
        await self._abandon(lost)
        hops, out = await self._open_span(lost.start, lost.end, lost.inputs, pending)
        assert out is not None  # pending was given
        return hops, out

    async def _move(self, i: int, why: str) -> tuple[list[_HopSession], None]:
        """Move hop ``i`` (already up to date) elsewhere, e.g. because its node is draining."""
        old = self.hops[i]
        log.info("moving blocks [%d, %d) off %s (%s)", old.start, old.end, old.peer_id[-8:], why)
        self.client.avoid(old.peer_id, ban=False)
        try:
            hops, _ = await self._open_span(old.start, old.end, old.inputs)
        except GenerationFailed:
            old.draining = False  # nowhere to go: keep using it while it still serves us
            return [old], None
        if self.verifier is not None:
            self.verifier.retire(old)
        await self._close(old)
        return hops, None

    async def rollback(self, gen: Generation) -> int:
        """Go back to the verifier's rollback position: discard the tokens computed from a wrong
        output, rebuild hops whose peer is now banned (replay on good peers), and let the other
        hops' next step truncate their caches. Returns how many new tokens were discarded."""
        verifier = self.verifier
        if verifier is None or verifier.rollback_to is None:
            return 0
        checks = await verifier.locked()
        try:
            position = verifier.rollback_to
            verifier.rollback_to = None
            before = len(gen.new_ids)
            gen.rewind(position)
            log.warning("rolling back to position %d: %d token(s) discarded", position,
                        before - len(gen.new_ids))
            verifier.truncate(position)
            for hop in self.hops:
                hop.inputs = _truncate_rows(hop.inputs, position)
            banned = self.client.banned()
            i = 0
            while i < len(self.hops):
                hop = self.hops[i]
                if hop.peer_id in banned:
                    if hop.check is not None and hop.check.convicted:
                        hop.tally.reject()  # what it returned after the window it was caught in, too
                    await self._abandon(hop)
                    replaced, _ = await self._open_span(hop.start, hop.end, hop.inputs)
                    self.hops[i:i + 1] = replaced
                    i += len(replaced)
                else:
                    i += 1
            return before - len(gen.new_ids)
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


class FleetClient:
    """Generates text across the fleet that ``node`` sees. Create with ``FleetClient.create``."""

    def __init__(self, node: Node, model: ClientModel, config: ClientConfig = ClientConfig()) -> None:
        """Raises ConfigError if ``config.local_blocks`` differs from the blocks ``model`` holds."""
        if model.local_blocks != config.local_blocks:
            raise ConfigError(f"the client model holds {model.local_blocks} local blocks, the "
                              f"config asks for {config.local_blocks} (ClientModel.load(local_blocks=))")
        self.node = node
        self.model = model
        self.config = config
        self.limits = TensorLimits(max_tokens=1 << 16, hidden_size=model.head.config.hidden_size)
        self._avoid_until: dict[str, float] = {}
        self._unreachable: set[str] = set()  # banned only because a session open failed (network)
        self.open_sessions: Counter[str] = Counter()  # peer -> sessions this client has open there
        self.pipelines: set[Pipeline] = set()  # of the generations running now
        self.block_s: dict[str, float] = {}  # peer -> measured s per block per decode step (EWMA)
        # The LM head (~7 ms a row): one matrix product for the rows of all concurrent generations,
        # in a worker thread (a lone row on the event loop); decoding generations wait for each
        # other there (lockstep).
        # Generations of this client past their prefill and not done, per wave (their route).
        self.decoding: Counter[Hashable] = Counter()
        self.head_batcher = HeadBatcher(model.head, window_s=config.lockstep_window_s,
                                        decoding=lambda: self.decoding)
        # What this client observed, per peer: sessions opened, positions computed (the owner
        # report of each peer must agree).
        self.sessions_opened: Counter[str] = Counter()
        self.positions_computed: Counter[str] = Counter()
        # Receipts: the node's key and ledger (stand-in nodes in tests may have none).
        self.receipts: ReceiptDesk | None = getattr(node, "receipts", None)
        cfg = model.head.config
        self.flops_per_token_block = flops_per_token_block(cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads,
                                                           cfg.head_dim, cfg.ffn_size)
        self.receipts_stored = 0  # countersigned receipts received
        self.receipts_refused: Counter[str] = Counter()  # exchanges that failed, by reason
        self.receipts_pending = 0  # exchanges of abandoned hops still running in the background
        # How often each peer's hop sessions are checked (BOINC-style adaptive replication),
        # learned across this client's generations, and across runs in the node's data directory.
        self.trust = TrustBook(min_rate=config.verify_min_rate)
        data_dir = getattr(node, "data_dir", None)
        self.trust_file: Path | None = None if not config.verify else (
            config.trust_file.expanduser() if config.trust_file is not None
            else data_dir.trust if data_dir is not None else None)
        self._trust_saved_at = -math.inf
        self._trust_save_failed = False
        if self.trust_file is not None:
            self._load_trust(self.trust_file)

    def _load_trust(self, path: Path) -> None:
        """What earlier runs learned about peers; a missing file is a fresh start, a damaged one
        is logged and ignored (every peer is new again: more checks, never fewer)."""
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_TRUST_FILE_BYTES + 1)
            if len(raw) > MAX_TRUST_FILE_BYTES:
                raise ValueError(f"larger than {MAX_TRUST_FILE_BYTES} bytes")
            n = self.trust.load(json.loads(raw))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:  # (json's errors are ValueErrors)
            log.warning("trust book %s ignored (%s): every peer starts as new", path, e)
            return
        log.info("trust book: %d peer(s) from %s", n, path)

    def leave_wave(self, wave: Hashable) -> None:
        """A generation stops decoding in ``wave`` (it finished, or its route changed)."""
        self.decoding[wave] -= 1
        if self.decoding[wave] <= 0:
            del self.decoding[wave]

    def save_trust(self, *, every_s: float = TRUST_SAVE_S) -> None:
        """Write the trust book to ``trust_file`` if it changed: at once when no generation is
        running, else at most every ``every_s``. Atomic (a crash leaves the old file or the
        new one); a failure is logged once and never stops a generation."""
        now = time.monotonic()
        if (self.trust_file is None or not self.trust.changed
                or (self.pipelines and now - self._trust_saved_at < every_s)):
            return
        tmp = self.trust_file.with_name(f".{self.trust_file.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.trust.to_json(), f, separators=(",", ":"))
            os.replace(tmp, self.trust_file)
        except OSError as e:
            if not self._trust_save_failed:
                log.warning("cannot save the trust book to %s: %s", self.trust_file, e)
            self._trust_save_failed = True
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        self.trust.changed = False
        self._trust_saved_at = now

    def record_step(self, peer_id: str, seconds: float, blocks: int) -> None:
        """A decode step on ``peer_id`` took ``seconds`` for ``blocks`` blocks (round trip included):
        the measurement that replaces the peer's claimed compute and load in route choice."""
        rtt = self.node.liveness.min_rtt_s.get(peer_id, 0.0)
        sample = max(0.0, seconds - rtt) / max(1, blocks)
        old = self.block_s.get(peer_id)
        self.block_s[peer_id] = sample if old is None else 0.7 * old + 0.3 * sample

    @classmethod
    async def create(cls, node: Node, model_path: str | Path | None = None,
                     config: ClientConfig = ClientConfig()) -> FleetClient:
        """Load the client's part of the model (tokenizer, embedding, head, and blocks
        ``[0, config.local_blocks)``) off the event loop."""
        model = await trio.to_thread.run_sync(
            functools.partial(ClientModel.load, model_path, local_blocks=config.local_blocks))
        return cls(node, model, config)

    # -- peers ---------------------------------------------------------------------------------
    def avoid(self, peer_id: str, ban: bool = True, *, unreachable: bool = False) -> None:
        """Avoid ``peer_id``: for ``ban_s`` after a fault, for a few seconds after a refusal.
        ``unreachable``: the fault was a session that could not be opened (a network error): the
        peer stays a last resort for routes that have no other host (``find_route``)."""
        self._avoid_until[peer_id] = time.monotonic() + (self.config.ban_s if ban else REFUSAL_PAUSE_S)
        if ban and unreachable:
            self._unreachable = (self._unreachable & self.banned()) | {peer_id}
        else:
            self._unreachable.discard(peer_id)

    def banned(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(p for p, until in self._avoid_until.items() if until > now)

    def candidates(self) -> list[Candidate]:
        """Hosts of our model among the peers this node completed a liveness round trip with
        (``Node.routable``), with measured RTTs and step times. A peer's gossiped load lags
        by seconds, so the sessions this client has open on it count too: concurrent generations
        spread over the fleet instead of all taking the one best route. Peers that verified
        misbehaviour reports accuse are marked (``Node.accusations``): routing uses them last."""
        rtt = self.node.liveness.min_rtt_s
        # Routable peers all have a measured RTT; were one missing, it would be assumed typical.
        typical = float(np.median(list(rtt.values()))) if rtt else None
        out = []
        for record in self.node.routable():
            own = record.peer_id == self.node.peer_id  # our own blocks: a loopback hop, no RTT
            if record.model_id != self.model.model_id or (own and self.node.hosting is None):
                continue
            if record.policy != "serve":  # its owner's policy says no: never open a session there
                continue
            regions = self.config.allow_regions
            if regions and not record.region.startswith(regions):
                continue
            cand = Candidate.from_record(record, 0.0 if own else rtt.get(record.peer_id, typical),
                                         self.block_s.get(record.peer_id))
            if cand is not None:
                mine = self.open_sessions[cand.peer_id]
                if mine:
                    cand = dataclasses.replace(cand, own_load=own_sessions_load(mine))
                out.append(cand)
        now = time.time()  # peers verified misbehaviour reports accuse: a last resort
        return mark_accused(out, lambda peer: self.node.accusations.is_accused(peer, now))

    def find_route(self, start: int | None = None, end: int | None = None) -> list[Hop]:
        """The best chain of peers for blocks ``[start, end)`` now (default: every block not run
        locally): the chain our running generations use where it costs little more, so that
        stage servers batch their steps (``protocols.routing``). Raises NoRoute."""
        start = self.model.local_blocks if start is None else start
        end = self.model.n_blocks if end is None else end
        follow = [[Hop(h.peer_id, h.start, h.end) for h in chain if start <= h.start and h.end <= end]
                  for chain in (p.routing or p.hops for p in self.pipelines)]
        candidates, banned = self.candidates(), self.banned()

        def route(avoided: frozenset[str]) -> list[Hop]:
            return find_route(candidates, start, end, now=time.time(), my_region=self.node.config.region,
                              banned=avoided, costs=self.config.costs, follow=follow)

        # A peer banned only because a session open failed (a dropped connection, a peer busy
        # dialling) is still the last resort where it is the only host: with one host per block,
        # one failed open made the fleet unusable for ban_s. A peer that is really gone fails the
        # open again, within the failover budget.
        last_resort = banned & self._unreachable
        try:
            try:
                return route(banned)
            except NoRoute:
                if not last_resort:
                    raise
                chain = route(banned - last_resort)
                log.info("no other host: routing through %s again after a failed open",
                         [h.peer_id[-8:] for h in chain if h.peer_id in last_resort])
                return chain
        except NoRoute as e:
            if self.config.allow_regions:
                raise NoRoute(e.block, f"no route within the allowed regions "
                              f"{','.join(self.config.allow_regions)}: {e}") from None
            raise

    def uncovered_blocks(self) -> list[int]:
        """Blocks no usable host in the fleet view serves: usable as routing decides (a host
        whose record still says ``joining`` covers nothing yet; counting it stopped the DHT
        lookups that would fetch its newer record, and the client waited out route_wait_s)."""
        banned = self.banned()
        covered = [False] * self.model.n_blocks
        for cand in self.candidates():
            if exclusion(cand, banned=banned, costs=self.config.costs) is None:
                for b in range(cand.start, min(cand.end, self.model.n_blocks)):
                    covered[b] = True
        return [b for b, c in enumerate(covered) if not c]

    async def wait_ready(self, timeout: float | None = None) -> list[Hop]:
        """Wait until some route covers every block. Blocks that gossip does not cover (hosts in
        another region, a node that just joined) are looked up in the DHT every few seconds:
        providers of their CIDs, then the providers' validated records. Raises GenerationFailed
        on timeout."""
        last: Exception | None = None
        next_lookup = trio.current_time() + self.config.dht_lookup_after_s
        with trio.move_on_after(timeout if timeout is not None else self.config.route_wait_s):
            while True:
                try:
                    return self.find_route()
                except NoRoute as e:
                    last = e
                missing = self.uncovered_blocks()
                if missing and trio.current_time() >= next_lookup:
                    await self.node.discovery.lookup_block_hosts(self.model.model_id, missing)
                    next_lookup = trio.current_time() + self.config.dht_lookup_every_s
                    continue
                await trio.sleep(0.2)
        raise GenerationFailed(f"the fleet does not cover the model: {last}")

    def open_own_stage(self) -> FramedStream:
        """A session stream to this node's own stage server (libp2p cannot dial ourselves): the
        server side runs in the node's nursery, exactly as for a peer's stream."""
        hosting = self.node.hosting
        if hosting is None:
            raise NetworkError("this node hosts no blocks")
        ours, theirs = loopback_pair(self.node.peer_id)

        async def serve() -> None:
            try:
                await hosting.handle_stream(theirs)
            except (NetworkError, RemoteProtocolError) as e:  # as the host's stream handler does
                log.debug("own stage session: %s", e)
            finally:
                await theirs.aclose()

        self.node.nursery.start_soon(serve)
        return ours

    async def ensure_connected(self, peer_id: str) -> None:
        if peer_id in self.node.host.connected_peers():
            return
        entry = self.node.view.get(peer_id)
        if entry is None:
            raise NetworkError(f"{peer_id[-8:]} is not in the fleet view")
        # Routing chose it (not banned, or its ban is over): really dial, whatever py-libp2p
        # remembers of an earlier failure (Host.forget_dial_failure).
        self.node.host.forget_dial_failure(peer_id)
        await self.node.host.connect_peer(peer_id, list(entry.record.addrs),
                                          timeout=self.config.open_timeout_s)

    # -- generation ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, *, chat: bool = False) -> list[int]:
        tok = self.model.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        ids = tok.encode(text)
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def stream(self, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, chat: bool = False,
               strict: bool | None = None) -> FleetGeneration:
        """An async iterator of ``(token_id, text_piece)`` as tokens are generated; its ``result``
        is set when it finishes. ``strict`` (default ``config.verify_strict``): tokens are held
        until every remote hop's work they depend on is verified. Raises ValueError for bad
        parameters (here, not when iterated)."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed)
        return FleetGeneration(self, self.encode_prompt(prompt, chat=chat), params,
                               strict=self.config.verify_strict if strict is None else strict)

    async def generate(self, prompt: str, *, on_token: Callable[[int, str], None] | None = None,
                       **kwargs: Any) -> FleetResult:
        """Generate across the fleet (arguments as ``stream``); ``on_token(id, piece)`` is called
        as tokens come. Raises GenerationFailed if the fleet cannot serve it."""
        generation = self.stream(prompt, **kwargs)
        async with aclosing(generation.run()) as tokens:
            async for token, piece in tokens:
                if on_token is not None:
                    on_token(token, piece)
        assert generation.result is not None  # set when run() completes
        return generation.result


class FleetGeneration:
    """One generation across the fleet. ``async for token_id, piece in generation: ...``"""

    def __init__(self, client: FleetClient, prompt_ids: list[int], params: SamplingParams, *,
                 strict: bool = False) -> None:
        self.client = client
        self.prompt_ids = prompt_ids
        self.params = params
        self.strict = strict
        self.result: FleetResult | None = None
        self.pipeline: Pipeline | None = None

    def __aiter__(self) -> AsyncIterator[tuple[int, str]]:
        return self.run()

    async def run(self) -> AsyncGenerator[tuple[int, str], None]:
        """Yield ``(token_id, text_piece)`` per new token (a final ``(-1, tail)`` may flush text
        held back mid-character). Close it (``aclosing``) to end early; sessions are closed.

        Verification (node/client/verifier.py) runs behind the tokens. When it catches a wrong output the
        generation rolls back to that position and continues on good peers, so ``result`` is the
        same tokens as an undisturbed run. A strict generation yields a token only once the work
        it depends on is verified (and verifies the last partial window before it ends); a
        non-strict one yields tokens at once and never retracts one (``result`` is authoritative)."""
        client = self.client
        gen = Generation(client.model.head, self.prompt_ids, self.params, client.model.tokenizer.stop_ids)
        text = TextStream(client.model.tokenizer)
        pipeline = self.pipeline = Pipeline(client, len(self.prompt_ids) + max(1, self.params.max_new_tokens))
        verifier = pipeline.verifier
        strict = self.strict and verifier is not None
        if verifier is not None:
            verifier.strict = strict
        released = rollbacks = 0
        wave: Hashable = None  # counted in client.decoding[wave] (the head's lockstep) if not None
        token_s: float | None = None  # this generation's time per token (EWMA)
        last_token: float | None = None
        await client.wait_ready()
        t0 = time.perf_counter()
        try:
            await pipeline.open()
            while True:
                if wave is not None and gen.done:
                    client.leave_wave(wave)
                    wave = None
                if verifier is not None and verifier.rollback_to is not None:
                    rollbacks += 1
                    if rollbacks > client.config.max_failovers:
                        raise GenerationFailed("too many rollbacks: wrong outputs keep coming")
                    verifier.stats.rolled_back += await pipeline.rollback(gen)
                    released = min(released, len(gen.new_ids))
                finished = False
                if not gen.done:
                    step = gen.next_input()
                    hidden = await pipeline.forward(step.hidden, step.position)
                    # Its wave: the generations on its route (all of them without waves). Its
                    # prompt's row joins that wave's batch; past the prompt it is waited for.
                    now_wave = pipeline.wave if client.config.waves else ()
                    if gen.new_ids and now_wave != wave:
                        if wave is not None:
                            client.leave_wave(wave)
                        client.decoding[now_wave] += 1
                        wave = now_wave
                    now = trio.current_time()
                    if last_token is not None:
                        took = now - last_token
                        token_s = took if token_s is None else 0.7 * token_s + 0.3 * took
                    last_token = now
                    max_wait = LOCKSTEP_SHARE * token_s if token_s is not None else 0.0
                    gen.feed_logits(await client.head_batcher.logits(hidden, max_wait, now_wave))
                elif verifier is None:
                    finished = True
                else:
                    await verifier.flush(everything=strict, timeout=client.config.verify_flush_s)
                    if verifier.rollback_to is not None:
                        continue
                    finished = True
                ready = len(gen.new_ids)
                if strict and not finished and verifier is not None:
                    frontier = verifier.frontier()
                    if verifier.rollback_to is not None:
                        ready = released
                    elif frontier is not None:
                        ready = max(released, min(ready, frontier + 1 - len(self.prompt_ids)))
                while released < ready:
                    token = gen.new_ids[released]
                    released += 1
                    yield token, text.push(token)
                if finished:
                    break
            tail = text.flush()
            if tail:
                yield -1, tail
        finally:
            if wave is not None:
                client.leave_wave(wave)
            await pipeline.aclose()
            client.save_trust()  # what its checks taught us about peers, for the next run
        elapsed = time.perf_counter() - t0
        verification = None
        if verifier is not None:
            ids = len(self.prompt_ids) + len(gen.new_ids)
            verifier.stats.unverified = max(0, ids - max(len(self.prompt_ids), verifier.verified_upto() + 1))
            verification = verifier.stats.to_dict()
        self.result = FleetResult(
            prompt_ids=self.prompt_ids, new_ids=gen.new_ids,
            text=client.model.tokenizer.decode(gen.new_ids, skip_special=True),
            tokens_per_s=len(gen.new_ids) / elapsed if elapsed > 0 else 0.0,
            route=pipeline.route, failovers=pipeline.failovers,
            stop_reason=gen.stop_reason or "length", verification=verification,
            chained_steps=pipeline.chained, chain_failures=pipeline.chain_failures)
