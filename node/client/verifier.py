"""The client's verifier: re-computes samples of every remote hop's work on an independent host.

Every remote hop of a generation gets a :class:`HopCheck`: the steps the hop's server returned
(inputs as sent, outputs as received, the server's signed commitment) and a background task, owned
by the verifier and run in the node's nursery, that re-runs them on a second host of the same
blocks (the *verifier host*). Verification **lags**: decode never waits for it.

- Sessions are sampled, windows are checked. When a hop session's first window completes (or the
  session ends or leaves the route before one did), the
  :class:`~idlefleet.protocols.verification.TrustBook` decides once whether that session is
  *shadowed*: always for a peer new to this client and in strict generations, for a trusted peer
  with a falling probability, never less than ``verify_min_rate`` (BOINC's adaptive replication,
  with the hop session as the job). A shadowed session has every window checked; the others have
  none, and their tokens stay "unverified".
  Why sessions and not windows: the verifier host's session must hold every earlier position of
  the hop (KV cache), so checking one sampled window re-computes every position before it too.
  Sampling windows (as before) made a trusted peer cost about as much re-computation as a new one
  (measured: 6.3-6.7 positions computed per generated token on a 3-hop route with verification,
  3.3 without); sampling sessions makes it cost the rate. A peer that cheats on a session is
  caught with at least the session's probability, as with one cheating window before. A window
  the hop and its verifier host agree on is a valid window of both (BOINC counts every result of
  an agreeing quorum): peers earn trust from being checked and from checking, so a fleet whose
  peers check each other reaches the low rates about twice as fast.
- Windows. Positions are grouped into windows of at least ``verify_window`` positions (aligned to
  steps; the prompt's prefill is in the first window). A shadowed session asks for a check as
  each window completes, ONE step carrying every input from where the verifier session's cache
  ends up to the end of the window.
- The last window. When a sampled window ends fewer than ``verify_window`` positions before the
  generation's last position, its check waits for the end of the generation and goes out with
  the last (partial) window's, as one step (non-strict generations; the same positions are
  re-computed and compared): a separate step of a few rows costs most of a full window's pass
  over the weights (a 10-block stage: 4 rows 1.3x one row, 16 rows 2.0x, 21 rows 2.3x).
- Compare. Every row with :func:`~idlefleet.protocols.verification.row_mismatch` against
  :data:`~idlefleet.protocols.verification.TOLERANCE` of the wire dtype.
- Mismatch. A third host (the *referee*) runs the prefix up to the first disputed position ``d``
  and then row ``d`` as its own one-row step; two of three within tolerance decide. The wrong
  peer is banned by this client (``FleetClient.avoid``) and a signed
  :class:`~idlefleet.protocols.receipts.MisbehaviourReport` goes to ``Node.report_misbehaviour``.
  A wrong primary: its hop's tally is rejected and the generation **rolls back** to ``d`` (the
  tokens after it are discarded; the hop is rebuilt on good peers by replay). A wrong verifier
  host: the referee's session becomes the verifier and the window is checked again. No third
  host of the blocks (a fleet that hosts each block exactly twice): this client is the referee,
  recomputing the disputed row from its own model file (``ClientConfig.verify_local_referee``).
  No referee at all, or no majority: the generation rolls back to ``d`` and both are avoided (no
  report: there is no evidence which one lied).
- No independent host of a hop's blocks: its positions stay unverified; the generation goes on.

The verifier opens its sessions through the narrow :class:`HopLink` the pipeline gives it, and
hands its verdicts to the generation as events (:meth:`Verifier.verdicts`: :class:`Convicted`,
:class:`Undecided`, each with the position to roll back to) instead of setting fields others poll.
A :class:`HopCheck`'s state is explicit: its lifecycle (:class:`CheckState`), whether its session is
sampled (:class:`Sample`) and whether a verifier host is at hand (:class:`Witness`).

Cancellation: :meth:`Verifier.aclose` cancels every check and closes the verifier sessions.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import trio

from idlefleet.node.client.hop import Exchange, HopSession, StageFailure
from idlefleet.node.model.gguf_loader import open_model
from idlefleet.node.model.stage import load_stage
from idlefleet.protocols.errors import IdlefleetError
from idlefleet.protocols.receipts import MisbehaviourReport
from idlefleet.protocols.tensors import WIRE_DTYPES, EncodedTensor, decode_hidden, encode_hidden
from idlefleet.protocols.verification import (
    TOLERANCE,
    RowProof,
    StepCommitment,
    row_digests,
    row_mismatch,
    rows_root,
)

if TYPE_CHECKING:
    from idlefleet.node.client.fleet import FleetClient

log = logging.getLogger(__name__)

MAX_VERIFIER_ATTEMPTS = 3  # verifier hosts tried for one check before the window stays unverified


def row_of(t: EncodedTensor, i: int) -> EncodedTensor:
    """Row ``i`` of an encoded ``[T, H]`` tensor, as a ``[1, H]`` tensor with the same bytes."""
    hidden = t.shape[1]
    width = hidden * WIRE_DTYPES[t.dtype].itemsize
    scales = t.scales[4 * i:4 * i + 4] if t.scales is not None else None
    return EncodedTensor(t.dtype, (1, hidden), t.data[i * width:(i + 1) * width], scales)


def proof(ex: Exchange, position: int) -> RowProof:
    """The row proof of ``position`` in step ``ex``."""
    i = position - ex.position
    return RowProof(i, tuple(row_digests(ex.sent)), tuple(row_digests(ex.received)), row_of(ex.received, i))

class CheckState(enum.Enum):
    """A primary hop session's check, through its life."""

    ACTIVE = "active"  # the hop is on the route: its windows are checked as they complete
    RETIRED = "retired"  # replaced in the route: check what it did, then stop
    CONVICTED = "convicted"  # its server was caught returning a wrong output: nothing more to check
    UNDECIDED = "undecided"  # a mismatch no referee could settle: nothing more to check


class Sample(enum.Enum):
    """Whether the session is checked at all: drawn once, at its first window."""

    UNDRAWN = "undrawn"
    SHADOWED = "shadowed"  # every window checked
    SKIPPED = "skipped"  # none checked: its tokens stay unverified


class Witness(enum.Enum):
    """The verifier host of a check."""

    NONE = "none"  # none open (none needed yet, or the last one failed: another is looked for)
    OPEN = "open"  # ``HopCheck.verifier`` is a session on an independent host
    UNAVAILABLE = "unavailable"  # no independent host at the last attempt (asked again later)


@dataclass(frozen=True)
class Convicted:
    """A verdict: ``peer`` (the hop of blocks ``[start, end)``) returned a wrong output at
    ``position``; it is banned and reported, and the generation rolls back to ``position``."""

    peer: str
    start: int
    end: int
    position: int


@dataclass(frozen=True)
class Undecided:
    """A verdict: no referee could settle ``position`` between ``peers`` (both avoided, no
    report); the generation rolls back to ``position``."""

    peers: tuple[str, str]
    position: int


Verdict = Convicted | Undecided


class HopLink(Protocol):
    """What the verifier needs of the pipeline: sessions on independent hosts."""

    async def open_session(self, peer_id: str, start: int, end: int) -> HopSession:
        """A session for blocks ``[start, end)`` on ``peer_id``; raises StageFailure."""
        ...

    async def exchange(self, session: HopSession, rows: np.ndarray, position: int) -> Exchange:
        """One step on ``session``, its reply checked; raises StageFailure."""
        ...


@dataclass(eq=False)
class HopCheck:
    """What is known about one primary hop session's work, and how far it is verified."""

    hop: HopSession
    records: list[Exchange] = field(default_factory=list)  # contiguous from position 0
    checked: int = 0  # positions [0, checked) verified
    due: int = 0  # verification asked for up to here
    window_start: int = 0
    deferred: int = 0  # a sampled window up to here, checked with the generation's short last one
    state: CheckState = CheckState.ACTIVE
    sample: Sample = Sample.UNDRAWN
    witness: Witness = Witness.NONE
    verifier: HopSession | None = None  # the session on the verifier host (witness OPEN)
    v_length: int = 0  # positions cached in the verifier session
    lock: trio.Lock = field(default_factory=trio.Lock)
    wake: trio.Event = field(default_factory=trio.Event)
    idle: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def end(self) -> int:
        return self.records[-1].position + self.records[-1].inputs.shape[0] if self.records else 0

    @property
    def dead(self) -> bool:
        """Nothing more to check: its server was caught, or could not be cleared."""
        return self.state in (CheckState.CONVICTED, CheckState.UNDECIDED)

    @property
    def finished(self) -> bool:
        return self.dead or (self.state is CheckState.RETIRED and self.checked >= self.end)

    def set_verifier(self, session: HopSession | None, v_length: int = 0) -> None:
        self.verifier, self.v_length = session, v_length
        self.witness = Witness.OPEN if session is not None else Witness.NONE

    def rows(self, attr: str, start: int, stop: int) -> np.ndarray:
        """``inputs`` or ``out`` rows of positions ``[start, stop)`` from the records."""
        parts = []
        for ex in self.records:
            n = ex.inputs.shape[0]
            lo, hi = max(start, ex.position), min(stop, ex.position + n)
            if lo < hi:
                parts.append(getattr(ex, attr)[lo - ex.position:hi - ex.position])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def record_at(self, position: int) -> Exchange:
        for ex in self.records:
            if ex.position <= position < ex.position + ex.inputs.shape[0]:
                return ex
        raise KeyError(position)

    def truncate(self, position: int) -> None:
        """Forget positions ``>= position`` (a rollback): a step straddling it is cut to the rows
        before it (its commitment stays the evidence for those)."""
        kept = []
        for ex in self.records:
            if ex.position >= position:
                continue
            if ex.position + ex.inputs.shape[0] > position:
                ex = ex.head(position - ex.position)
            kept.append(ex)
        self.records = kept
        self.checked = min(self.checked, position)
        self.due = min(self.due, position)
        self.deferred = min(self.deferred, position)
        self.window_start = min(self.window_start, position)
        self.v_length = min(self.v_length, position)


@dataclass
class VerificationStats:
    windows_checked: int = 0
    sessions_shadowed: int = 0  # remote hop sessions whose every window is checked
    sessions_skipped: int = 0  # ... whose windows are not checked (trusted peers, not sampled)
    mismatches: int = 0
    banned: list[str] = field(default_factory=list)
    rolled_back: int = 0  # new tokens discarded by rollbacks
    unverified: int = 0  # new tokens in the result not covered by a verified window
    reports: int = 0
    undecided: int = 0  # mismatches no referee could settle (both peers avoided, no report)
    local_referee: int = 0  # mismatches this client refereed itself (no third host of the blocks)
    # Per conviction of a primary: positions it had returned past its first wrong one by then.
    detection_lags: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"windows_checked": self.windows_checked, "sessions_shadowed": self.sessions_shadowed,
                "sessions_skipped": self.sessions_skipped, "mismatches": self.mismatches,
                "banned_peers": list(self.banned), "rolled_back_tokens": self.rolled_back,
                "unverified_tokens": self.unverified, "reports": self.reports,
                "undecided": self.undecided, "local_referee": self.local_referee,
                "detection_lag_max": max(self.detection_lags, default=None)}


class Verifier:
    """Lagging verification of one generation's remote hops (see the module docstring).
    ``strict``: every session is checked (the generation's tokens wait for their checks)."""

    def __init__(self, client: FleetClient, link: HopLink, max_length: int, *, strict: bool = False) -> None:
        self.client = client
        self.link = link
        self.window = self.client.config.verify_window
        self.tolerance = TOLERANCE[self.client.config.wire_dtype]
        self.checks: list[HopCheck] = []
        self._by_hop: dict[int, HopCheck] = {}  # id(hop) -> its check (the check keeps the hop alive)
        self.stats = VerificationStats()
        self.strict = strict
        self._verdicts: list[Verdict] = []  # not yet taken by the generation
        self._ending = False  # the generation computes no more positions
        self._last = max_length - 1  # where every hop's positions end if nothing stops it

    # -- fed by the pipeline ---------------------------------------------------------------------
    def check_of(self, hop: object) -> HopCheck | None:
        return self._by_hop.get(id(hop))

    def convicted(self, hop: object) -> bool:
        """Whether ``hop``'s server was caught returning a wrong output."""
        check = self.check_of(hop)
        return check is not None and check.state is CheckState.CONVICTED

    def record(self, hop: HopSession, ex: Exchange) -> None:
        """A remote hop returned a step (already signature-checked)."""
        check = self.check_of(hop)
        if check is None:
            check = self._by_hop[id(hop)] = HopCheck(hop)
            self.checks.append(check)
            self.client.node.nursery.start_soon(self._run, check)
        if ex.position < check.end:  # a re-sent step (rollback, replay): forget what it replaces
            check.truncate(ex.position)
        check.records.append(ex)
        if check.end - check.window_start >= self.window:
            self._window_done(check)

    def _shadowed(self, check: HopCheck) -> bool:
        """Whether ``check``'s session is checked at all: decided once, at its first window (see
        the module docstring). A strict generation checks every session."""
        if check.sample is Sample.UNDRAWN:
            if self.strict or self.client.trust.should_check(check.hop.peer_id):
                check.sample = Sample.SHADOWED
                self.stats.sessions_shadowed += 1
            else:
                check.sample = Sample.SKIPPED
                self.stats.sessions_skipped += 1
        return check.sample is Sample.SHADOWED

    def _window_done(self, check: HopCheck) -> None:
        check.window_start = check.end
        if not self._shadowed(check):
            return
        if not (self.strict or self._ending) and 0 < self._last - check.end < self.window:
            # Only a short last window is left: checked together at the end (flush), one step
            # instead of a second one of a few rows that costs most of a full window's pass.
            check.deferred = check.end
        else:
            self._ask(check, check.end)

    def _ask(self, check: HopCheck, upto: int) -> None:
        if upto > check.due:
            check.due = upto
            check.idle = trio.Event() if check.idle.is_set() else check.idle
            check.wake.set()

    def retire(self, hop: HopSession) -> None:
        """``hop`` left the route (failover, move): check everything it returned if its session is
        shadowed, then stop."""
        check = self.check_of(hop)
        if check is not None and not check.dead:
            check.state = CheckState.RETIRED
            if self._shadowed(check):
                self._ask(check, check.end)
            check.wake.set()

    def frontier(self) -> int | None:
        """Positions ``[0, frontier)`` are verified on every hop that can be verified (None: no
        hop constrains it)."""
        ends = [c.checked for c in self.checks
                if not c.finished and c.witness is not Witness.UNAVAILABLE and c.checked < c.end]
        return min(ends) if ends else None

    def verified_upto(self) -> int:
        """Positions ``[0, n)`` verified on every hop, unverifiable ones included."""
        ends = [c.checked for c in self.checks if not c.dead and c.checked < c.end]
        return min(ends) if ends else 1 << 62

    async def flush(self, *, everything: bool, timeout: float) -> None:
        """Wait (up to ``timeout``) until the asked-for checks are done; with ``everything`` ask
        for every recorded position first (strict mode)."""
        self._ending = True
        for check in self.checks:
            if check.dead or check.finished:
                continue
            if check.deferred > check.checked:
                self._ask(check, check.deferred)
            check.deferred = 0
            if everything:
                self._ask(check, check.end)
            elif check.end > check.window_start:  # the last, partial window: checked if shadowed
                self._window_done(check)
        with trio.move_on_after(timeout):
            for check in list(self.checks):
                if not check.dead and check.due > check.checked:
                    await check.idle.wait()

    def finish(self, positions: int, prompt: int) -> dict[str, Any]:
        """The generation ended with ``positions`` ids (``prompt`` of them the prompt's): the
        new tokens not covered by a verified window are unverified. Returns the stats' dict."""
        self.stats.unverified = max(0, positions - max(prompt, self.verified_upto() + 1))
        return self.stats.to_dict()

    # -- verdicts and rollback ----------------------------------------------------------------------
    def verdicts(self) -> list[Verdict]:
        """The verdicts reached since the last call (each asks for a rollback to its position)."""
        taken, self._verdicts = self._verdicts, []
        return taken

    async def locked(self) -> list[HopCheck]:
        """Take every check's lock (waits for checks in flight); the caller releases them."""
        checks = list(self.checks)
        for check in checks:
            await check.lock.acquire()
        return checks

    def truncate(self, position: int, discarded: int) -> None:
        """After a rollback to ``position`` that discarded ``discarded`` new tokens (the caller
        holds the locks)."""
        self.stats.rolled_back += discarded
        for check in self.checks:
            check.truncate(position)

    # -- the background task per hop ----------------------------------------------------------------
    async def _run(self, check: HopCheck) -> None:
        with check.scope:
            try:
                while not check.finished:
                    if check.due <= check.checked:
                        check.idle.set()
                        await check.wake.wait()
                        check.wake = trio.Event()
                        continue
                    async with check.lock:
                        if check.due > check.checked and not check.dead:
                            await self._check(check, check.due)
            except Exception:  # never let a verification bug end the node: this hop stays unverified
                log.exception("verification of %s failed", check.hop.peer_id[-8:])
                check.witness = Witness.UNAVAILABLE
            finally:
                check.idle.set()
                if check.verifier is not None:
                    with trio.CancelScope(shield=True):
                        await check.verifier.close()

    def _pick_host(self, check: HopCheck, exclude: set[str]) -> str | None:
        hop = check.hop
        banned = self.client.banned()
        hosts = [c for c in self.client.candidates()
                 if c.start <= hop.start and hop.end <= c.end and c.peer_id not in banned
                 and c.peer_id not in exclude and c.peer_id != hop.peer_id]
        if not hosts:
            return None
        best: str = min(hosts, key=lambda c: (c.rtt_s if c.rtt_s is not None else 1.0) + c.load).peer_id
        return best

    async def _open(self, peer_id: str, check: HopCheck) -> HopSession:
        return await self.link.open_session(peer_id, check.hop.start, check.hop.end)

    async def _send(self, session: HopSession, check: HopCheck, start: int, stop: int) -> Exchange:
        # The session's tally and the peer's count in the client's counters (its owner report
        # counts it) are the hop session's own.
        return await self.link.exchange(session, check.rows("inputs", start, stop), start)

    async def _check(self, check: HopCheck, upto: int) -> None:
        """Verify positions ``[check.checked, upto)`` of ``check`` (holding its lock)."""
        upto = min(upto, check.end)
        tried: set[str] = set()
        for _ in range(MAX_VERIFIER_ATTEMPTS):
            if check.verifier is None:
                peer = self._pick_host(check, tried)
                if peer is None:
                    check.witness = Witness.UNAVAILABLE
                    check.due = check.checked  # asked again when the next window completes
                    return
                tried.add(peer)
                try:
                    check.set_verifier(await self._open(peer, check))
                except StageFailure as e:
                    self.client.avoid(peer, e.ban)
                    continue
            session = check.verifier
            assert session is not None  # opened above, or kept from the last check
            check.witness = Witness.OPEN
            start = min(check.v_length, check.checked)
            try:
                witness = await self._send(session, check, start, upto)
            except StageFailure as e:
                log.info("verifier host failed: %s", e)
                self.client.avoid(session.peer_id, e.ban)
                await session.abandon()
                check.set_verifier(None)
                continue
            check.v_length = upto
            await self._compare(check, witness, upto)
            return
        check.due = check.checked  # no verifier host answered: unverified for now

    async def _compare(self, check: HopCheck, witness: Exchange, upto: int) -> None:
        lo = check.checked
        mine = check.rows("out", lo, upto)
        theirs = witness.out[lo - witness.position:upto - witness.position]
        bad = np.flatnonzero(row_mismatch(mine, theirs) > self.tolerance)
        self.stats.windows_checked += 1
        assert check.verifier is not None
        if bad.size == 0:
            check.checked = upto
            check.hop.tally.verify(upto - lo)
            check.verifier.tally.verify(upto - lo)
            # Both results of an agreeing pair count (BOINC's quorum: every result in it is
            # valid): the verifier host computed the window right as well, and it could not know
            # it was checking (its session looks like any other).
            self.client.trust.valid(check.hop.peer_id)
            self.client.trust.valid(check.verifier.peer_id)
            return
        d = lo + int(bad[0])
        self.stats.mismatches += 1
        if d > lo:  # rows before the first disputed one agree
            check.hop.tally.verify(d - lo)
            check.checked = d
        log.warning("hop %s [%d, %d) disagrees with verifier %s at position %d", check.hop.peer_id[-8:],
                    check.hop.start, check.hop.end, check.verifier.peer_id[-8:], d)
        await self._referee(check, witness, d)

    async def _referee(self, check: HopCheck, witness: Exchange, d: int) -> None:
        assert check.verifier is not None
        primary, verifier = check.hop, check.verifier
        accused_ex = check.record_at(d)
        judge: Exchange | None = None
        referee: HopSession | None = None
        tried = {verifier.peer_id}
        for _ in range(MAX_VERIFIER_ATTEMPTS):
            peer = self._pick_host(check, tried)
            if peer is None:
                break
            tried.add(peer)
            try:
                referee = await self._open(peer, check)
                if d > 0:
                    await self._send(referee, check, 0, d)
                judge = await self._send(referee, check, d, d + 1)
                break
            except StageFailure as e:
                self.client.avoid(peer, e.ban)
                if referee is not None:
                    await referee.abandon()
                referee = None
        if judge is None and self.client.config.verify_local_referee:
            judge = await self._local_judge(check, d)
        p_row = accused_ex.out[d - accused_ex.position][None]
        v_row = witness.out[d - witness.position][None]
        p_ok = v_ok = False
        if judge is not None:
            r_row = judge.out[:1]
            p_ok = float(row_mismatch(p_row, r_row)[0]) <= self.tolerance
            v_ok = float(row_mismatch(v_row, r_row)[0]) <= self.tolerance
        if judge is not None and v_ok and not p_ok:
            self.stats.detection_lags.append(check.end - d)
            await self._convict(primary.peer_id, accused_ex, witness, judge, d)
            primary.tally.reject()
            check.state = CheckState.CONVICTED
            self._verdicts.append(Convicted(primary.peer_id, primary.start, primary.end, d))
            if referee is not None:
                await referee.close()
            return
        if judge is not None and p_ok and not v_ok:
            await self._convict(verifier.peer_id, witness, accused_ex, judge, d)
            verifier.tally.reject()
            await verifier.close()
            # The referee verifies from now on; a local one cannot: another host is looked for.
            check.set_verifier(referee, d + 1 if referee is not None else 0)
            return  # the window is checked again (due > checked) against the new verifier
        # No referee, or no majority: trust neither for this output.
        log.warning("no referee could settle position %d of blocks [%d, %d); avoiding %s and %s",
                    d, primary.start, primary.end, primary.peer_id[-8:], verifier.peer_id[-8:])
        self.stats.undecided += 1
        for peer in (primary.peer_id, verifier.peer_id):
            self.client.avoid(peer)
        check.state = CheckState.UNDECIDED
        self._verdicts.append(Undecided((primary.peer_id, verifier.peer_id), d))
        if referee is not None:
            await referee.close()

    async def _local_judge(self, check: HopCheck, d: int) -> Exchange | None:
        """The last-resort referee when no third host serves the hop's blocks (a fleet that hosts
        every block exactly twice): this client loads the hop's blocks from its own model file,
        runs the inputs it sent for positions ``[0, d]`` as one prefill, and signs its own row
        ``d`` like a server would (its commitment names it as server and client), so the report
        it gossips carries three signed rows. The stage is dropped afterwards. None if the model
        file is not at hand."""
        client, hop = self.client, check.hop
        path = client.model.path
        if path is None:
            return None
        dtype = client.config.wire_dtype
        limits = client.limits
        sent_all = encode_hidden(check.rows("inputs", 0, d + 1), dtype)
        x = decode_hidden(sent_all, limits)  # what the servers were given, wire rounding included

        def recompute() -> np.ndarray:
            with open_model(path) as mf:
                stage = load_stage(mf, hop.start, hop.end)
            out: np.ndarray = stage.forward(x, stage.new_cache(capacity=d + 1), 0)
            return out

        try:
            out = await trio.to_thread.run_sync(recompute)
        except (OSError, IdlefleetError) as e:
            log.warning("the local referee could not recompute blocks [%d, %d): %s", hop.start, hop.end, e)
            return None
        self.stats.local_referee += 1
        sent = encode_hidden(x[d:d + 1], dtype)
        received = encode_hidden(out[d:d + 1], dtype)
        me = client.node.peer_id
        commitment = StepCommitment(me, me, client.model.model_id, hop.start, hop.end, 0, d, 1,
                                    rows_root(row_digests(sent)), rows_root(row_digests(received)))
        return Exchange(d, x[d:d + 1], sent, received, decode_hidden(received, limits), commitment,
                        commitment.sign(client.node.key))

    async def _convict(self, accused: str, bad: Exchange, w1: Exchange, w2: Exchange, d: int) -> None:
        """Ban ``accused`` and report it with the two witnesses' commitments."""
        self.client.avoid(accused)
        self.client.trust.invalid(accused)
        if accused not in self.stats.banned:
            self.stats.banned.append(accused)
        log.warning("peer %s returned a wrong output at position %d: banned, reported", accused[-8:], d)
        signed = [(ex.commitment, ex.sig) for ex in (bad, w1, w2)]
        try:
            wire_forms = [c.encode(sig) for c, sig in signed if c is not None and sig is not None]
            if len(wire_forms) != 3:
                raise IdlefleetError("a step without a signed commitment")
            report = MisbehaviourReport(self.client.node.peer_id, d, wire_forms[0],
                                        (wire_forms[1], wire_forms[2]),
                                        (proof(bad, d), proof(w1, d), proof(w2, d)))
            raw = report.encode(self.client.node.key)
        except IdlefleetError as e:  # our own evidence could not be built: a local error
            log.warning("could not build a misbehaviour report: %s", e)
            return
        self.stats.reports += 1
        await self.client.node.report_misbehaviour(raw)

    # -- end ------------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Cancel every check (each closes its verifier session, shielded)."""
        for check in self.checks:
            check.scope.cancel()
