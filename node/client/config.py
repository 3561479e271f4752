"""What a fleet client is configured with and hands back: ``ClientConfig`` (a frozen config object,
checked on construction), ``ClientModel`` (the part of the model the client holds), ``FleetResult``
and ``GenerationFailed``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idlefleet.node.model.gguf_loader import open_model
from idlefleet.node.model.locate import find_default_model
from idlefleet.node.model.stage import Head, Stage, load_head, load_stage
from idlefleet.node.model.tokenizer import Tokenizer
from idlefleet.protocols.errors import ConfigError, IdlefleetError
from idlefleet.protocols.routing import RouteCosts
from idlefleet.protocols.tensors import WIRE_DTYPES


class GenerationFailed(IdlefleetError):
    """The fleet could not finish the generation (no route left after failovers)."""


# A reply's hidden values beyond this are a bad reply (SmolLM2's largest activations are ~2.5e4);
# far below where the next RMSNorm overflows float32 (~7e17) and turns every logit into NaN.
MAX_HIDDEN_ABS = 1e6


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


