"""The fleet client: keeps the embedding and LM head, streams hidden states through remote stages.

Token ids and text stay in this process: only hidden states travel, over Noise-encrypted libp2p
streams (what those reveal to each hop: README "Privacy"; ``ClientConfig.local_blocks`` keeps the
first blocks here so the first hop does not receive token embeddings). A generation
(``node/client/generation.py``) opens one pipeline session per hop of a route
(``protocols.routing``, ``node/client/pipeline.py``) and steps it token by token. When a hop dies
(SIGKILL), goes silent (SIGSTOP: its step deadline expires), refuses or sends a bad reply (another
dtype, non-finite or out-of-range values), the peer is banned for a while, only that hop's span is
re-routed, and the span's past inputs are replayed to rebuild the KV cache on the replacement; the
tokens are the same as an undisturbed run. A hop that says it is draining is moved the same way,
without an error. Every hop session that computed something ends with a receipt exchange
(``node/client/hop.py``): closed normally, moved, or abandoned after a failure (then in the
background, bounded); the double-signed receipt, or the server's refusal, goes to the node's
ledger. Our own mistakes (an invalid ``ClientConfig``, a prompt longer than the context) are raised
as local errors before any peer is contacted.

:class:`FleetClient` owns what outlives one generation: the peers it avoids, its measured step
times, the trust book, its counters (``statistics()``), and the head batcher.

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
import time
from collections import Counter
from collections.abc import Callable, Hashable
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from idlefleet.node.client.config import ClientConfig, ClientModel, FleetResult, GenerationFailed
from idlefleet.node.client.generation import FleetGeneration
from idlefleet.node.client.hop import HopEnv
from idlefleet.node.client.stats import ClientCounters, ClientStatistics
from idlefleet.node.model.batcher import HeadBatcher
from idlefleet.node.model.sampling import SamplingParams
from idlefleet.node.owner.ledger import ReceiptDesk
from idlefleet.node.runtime.node import Node
from idlefleet.p2p.errors import NetworkError
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.loopback import loopback_pair
from idlefleet.protocols import session as S
from idlefleet.protocols.errors import ConfigError, RemoteProtocolError
from idlefleet.protocols.receipts import flops_per_token_block
from idlefleet.protocols.routing import (
    Candidate,
    Hop,
    NoRoute,
    exclusion,
    find_route,
    mark_accused,
)
from idlefleet.protocols.serving import peer_usable
from idlefleet.protocols.tensors import TensorLimits
from idlefleet.protocols.verification import TrustBook

if TYPE_CHECKING:
    from idlefleet.node.client.pipeline import Pipeline

__all__ = ["ClientConfig", "ClientModel", "FleetClient", "FleetGeneration", "FleetResult",
           "GenerationFailed", "own_sessions_load"]

log = logging.getLogger(__name__)

REFUSAL_PAUSE_S = 5.0  # a peer that refused a session (busy, draining) is avoided this long
# The trust book in the data directory (FleetClient.save_trust): saved at most this often while
# generations run, and read only up to this size (4096 peers take ~330 KB).
TRUST_SAVE_S = 10.0
MAX_TRUST_FILE_BYTES = 1 << 20
_DEFAULT_CONFIG = ClientConfig()  # frozen: one shared default


def own_sessions_load(sessions: int) -> float:
    """The load that ``sessions`` of our own open on a peer add in route costs: 0.45 for one
    (its route costs ~1.8x), rising with every further one (0.6, 0.68, 0.72, ...) and never
    reaching 0.9, so concurrent generations spread evenly over equal hosts however many there are
    (a flat 0.5 per session capped at 0.9 made hosts with 2 and with 6 sessions look alike)."""
    return 0.9 * sessions / (sessions + 1)


class FleetClient:
    """Generates text across the fleet that ``node`` sees. Create with ``FleetClient.create``."""

    def __init__(self, node: Node, model: ClientModel, config: ClientConfig = _DEFAULT_CONFIG) -> None:
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
        # Sessions opened, positions computed, open sessions per peer, receipts: written by this
        # client's hop sessions through its methods, published by statistics().
        self.counters = ClientCounters()
        self.pipelines: set[Pipeline] = set()  # of the generations running now (track/untrack)
        self.block_s: dict[str, float] = {}  # peer -> measured s per block per decode step (EWMA)
        # The LM head (~7 ms a row): one matrix product for the rows of all concurrent generations,
        # in a worker thread (a lone row on the event loop); decoding generations wait for each
        # other there (lockstep).
        # Generations of this client past their prefill and not done, per wave (their route).
        self.decoding: Counter[Hashable] = Counter()
        self.head_batcher = HeadBatcher(model.head, window_s=config.lockstep_window_s,
                                        decoding=lambda: self.decoding)
        # Receipts: the node's key and ledger (stand-in nodes in tests may have none).
        self.receipts: ReceiptDesk | None = getattr(node, "receipts", None)
        cfg = model.head.config
        self.flops_per_token_block = flops_per_token_block(cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads,
                                                           cfg.head_dim, cfg.ffn_size)
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

    def statistics(self) -> ClientStatistics:
        """A snapshot of this client's counters."""
        return self.counters.snapshot()

    @functools.cached_property
    def hop_env(self) -> HopEnv:
        """What this client's hop sessions share (built at the first session: stand-in nodes in
        tests may lack what sessions need)."""
        return HopEnv(me=self.node.peer_id, model_id=self.model.model_id, config=self.config,
                      limits=self.limits, hidden_size=self.model.head.config.hidden_size,
                      flops_per_token_block=self.flops_per_token_block, desk=self.receipts,
                      counters=self.counters, connect=self._connect,
                      spawn=lambda fn, *args: self.node.nursery.start_soon(fn, *args))

    async def _connect(self, peer_id: str) -> FramedStream:
        """A session stream to ``peer_id`` (our own stage server: a loopback). Raises NetworkError."""
        if peer_id == self.node.peer_id:
            return self.open_own_stage()
        await self.ensure_connected(peer_id)
        return await self.node.host.open_stream(peer_id, S.STAGE_PROTOCOL, timeout=self.config.open_timeout_s)

    def track(self, pipeline: Pipeline) -> None:
        """A generation's pipeline routes: its chain is one the client's next routes follow."""
        self.pipelines.add(pipeline)

    def untrack(self, pipeline: Pipeline) -> None:
        self.pipelines.discard(pipeline)

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
                     config: ClientConfig = _DEFAULT_CONFIG) -> FleetClient:
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
            if own and self.node.hosting is None:
                continue
            # Its record says it takes sessions for our model (protocols.serving: "route").
            if peer_usable(record, "route", model_id=self.model.model_id) is not None:
                continue
            regions = self.config.allow_regions
            if regions and not record.region.startswith(regions):
                continue
            cand = Candidate.from_record(record, 0.0 if own else rtt.get(record.peer_id, typical),
                                         self.block_s.get(record.peer_id))
            if cand is not None:
                mine = self.counters.open_on(cand.peer_id)
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

