"""Cross-session batching of stage steps: the stage server's compute path.

Session handlers submit their steps to one :class:`StepBatcher`. Steps that arrive within a short
window (``window_s``, at most a few ms, cut short as soon as every session that is due has a step
queued) are computed together in one worker-thread call (:meth:`Stage.forward_batch`): each
weight is read from memory once for all of them. A lone session never waits: with one active
session (or every due session already queued) the batch starts at once.

*Due* sessions: those that stepped within ``STEPPING_S`` and at least half their own usual
interval between steps ago (a verifier's session that steps once per window is not due right
after its step), plus sessions open but not stepped yet. *Lockstep*: a client's concurrent
generations leave its LM head together (:class:`HeadBatcher`), so the steps of one client's
sessions arrive together, give or take that client's own scheduling (on a loaded machine
several ms apart). While a step of a client is queued and another of its due sessions is not,
the window stretches to ``lockstep_s``: a batch of 4 instead of two of 2 halves the weight
passes. Sessions of other clients are independent of it; they are waited for ``window_s`` only.

A batch of at most ``inline_rows`` rows (the stage server uses 1: a lone decode step) is computed
on the event loop itself, under the same limiter. A thread costs two wake-ups per step (loop to
worker, worker back to loop) and the GIL passed back and forth around them: 0.3-0.5 ms per step on
a loaded 2-core machine, a quarter of what a hop adds to a token (bench/pipeline.py). The price is
that the loop is busy for that one step's compute (~1 ms per block on SmolLM2): other tasks (a
heartbeat, another session's frame) wait that long, never longer; anything bigger (a prefill
chunk, a batch of several sessions) still runs in the thread, with the loop free meanwhile.

There is no background task: the first submitter that finds no batch running *leads* — it waits
out the window, takes the queue (up to ``max_batch_tokens`` rows), runs it, hands each waiter its
result, and passes the lead to the oldest step still queued. The leader's batch runs shielded from
cancellation (bounded: the window plus one compute call, which a thread cannot abandon anyway); a
waiter cancelled before its batch starts is simply dropped from the queue.

:class:`HeadBatcher` is the client's counterpart: the LM head rows of a client's concurrent
generations, computed together off the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np
import trio

from idlefleet.node.model.kvcache import KVCache
from idlefleet.node.model.stage import Head, Stage
from idlefleet.protocols.errors import ModelInputError

STEPPING_S = 1.0  # a session that sent a step this recently is expected to send the next soon


@dataclass(eq=False)
class _Job:
    hidden: np.ndarray  # [T, H]
    group: Hashable = None  # the client (peer) whose session this step is of; a head row's wave
    stage: Stage | None = None  # None for LM head jobs (HeadBatcher)
    cache: KVCache | None = None
    position: int = 0
    wake: trio.Event = field(default_factory=trio.Event)  # set on a change of lead or finished
    lead: bool = False  # this job's waiter must lead the next batch
    taken: bool = False  # in a batch that has started
    finished: bool = False
    result: np.ndarray | None = None
    error: Exception | None = None
    max_wait: float | None = None  # HeadBatcher: how long this row may wait for others (leading)
    gathering_since: float | None = None  # when it first led a batch's gathering


@dataclass
class BatcherStatistics:
    batches: int = 0
    steps: int = 0
    max_batch: int = 0  # most steps computed together
    compute_s: float = 0.0
    inline: int = 0  # batches computed on the event loop (at most inline_rows rows)
    gather_s: float = 0.0  # time batch leaders waited for other sessions' steps (``_gather``)


@dataclass
class _Stepping:
    """When a session's last step came, its usual interval between steps, and its client."""

    last: float
    group: str | None
    interval: float | None = None  # EWMA; None until its second step


class StepBatcher:
    """Computes the steps of concurrent sessions together; see the module docstring.

    ``active()`` says how many sessions are open (those that have not stepped yet are due).
    ``on_batch(seconds, steps)`` is called after each batch (on the event loop). A batch of at
    most ``inline_rows`` rows is computed on the event loop, not in a thread (0: never).
    ``lockstep_s`` (at least ``window_s``) is how long a batch waits for due sessions of a client
    that already has a step in it.
    """

    def __init__(self, limiter: trio.CapacityLimiter, active: Callable[[], int], *,
                 window_s: float = 0.002, lockstep_s: float = 0.0, max_batch_tokens: int = 4096,
                 inline_rows: int = 0, on_batch: Callable[[float, int], None] | None = None) -> None:
        self._limiter = limiter
        self._active = active
        self.window_s = window_s
        self.lockstep_s = max(window_s, lockstep_s)
        self.max_batch_tokens = max_batch_tokens
        self.inline_rows = inline_rows
        self._on_batch = on_batch or (lambda seconds, steps: None)
        self._queue: list[_Job] = []
        self._stepped: dict[int, _Stepping] = {}  # id(cache) -> its session's stepping
        self._leading = False
        self._arrival = trio.Event()
        self.stats = BatcherStatistics()

    async def forward(self, stage: Stage, hidden: np.ndarray, cache: KVCache,
                      position: int, group: str | None = None) -> np.ndarray:
        """``stage.forward(hidden, cache, position)``, batched with other sessions' steps.
        ``group`` names the client whose session this is (see lockstep in the module docstring).

        Raises :class:`ModelInputError` as ``forward`` would (for this step only). At most one step
        per cache may be in flight (a session's handler awaits each step)."""
        now = trio.current_time()
        if len(self._stepped) > 4096:  # sessions never forgotten (a caller without forget())
            self._stepped = {k: s for k, s in self._stepped.items() if s.last >= now - STEPPING_S}
        st = self._stepped.get(id(cache))
        if st is None:
            self._stepped[id(cache)] = _Stepping(now, group)
        else:
            gap = now - st.last
            st.interval = gap if st.interval is None else 0.7 * st.interval + 0.3 * gap
            st.last, st.group = now, group
        return await self._submit(_Job(hidden, group, stage, cache, position))

    def forget(self, cache: KVCache) -> None:
        """A session ended: its cache will send no more steps."""
        self._stepped.pop(id(cache), None)

    def _due(self) -> tuple[int, set[Hashable]]:
        """How many sessions without a queued step are due (see the module docstring), and
        their clients (None for sessions that have not stepped yet)."""
        now = trio.current_time()
        queued = {id(j.cache) for j in self._queue}
        due = [s.group for key, s in self._stepped.items()
               if key not in queued and now - s.last <= STEPPING_S
               and (s.interval is None or now - s.last >= 0.5 * s.interval)]
        fresh = max(0, self._active() - len(self._stepped))
        return len(due) + fresh, set(due) | ({None} if fresh else set())

    async def _submit(self, job: _Job) -> np.ndarray:
        self._queue.append(job)
        self._arrival.set()
        if not self._leading:
            self._leading = job.lead = True
        while True:
            try:
                while not (job.finished or job.lead):
                    await job.wake.wait()
                    job.wake = trio.Event()
            except BaseException:  # cancelled while waiting: leave the queue, pass on a lead
                if not job.taken:
                    self._queue.remove(job)
                    if job.lead:
                        self._pass_lead()
                raise
            if job.finished:
                break
            # Lead a batch. It holds this job, except in a HeadBatcher whose batch was another
            # (complete) wave: the lead then comes back to this job, still first in the queue.
            job.lead = False
            await self._lead()
        if job.error is not None:
            raise job.error
        assert job.result is not None  # set when finished unless error is
        return job.result

    def _pass_lead(self) -> None:
        self._leading = bool(self._queue)
        if self._queue:
            self._queue[0].lead = True
            self._queue[0].wake.set()

    async def _lead(self) -> None:
        """Gather, compute and deliver one batch (this task's own step is the queue's first)."""
        with trio.CancelScope(shield=True):
            await self._gather()
            batch = self._take()
            rows = sum(job.hidden.shape[0] for job in batch)
            started = time.perf_counter()
            if rows <= self.inline_rows:  # small: hand-offs to a thread would cost more
                await acquire(self._limiter)
                try:
                    self._compute(batch)
                finally:
                    self._limiter.release()
                self.stats.inline += 1
            else:
                await trio.to_thread.run_sync(self._compute, batch, limiter=self._limiter)
            seconds = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.steps += len(batch)
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        self.stats.compute_s += seconds
        self._on_batch(seconds, len(batch))
        for job in batch:
            job.finished = True
            job.wake.set()
        self._pass_lead()

    def _take(self) -> list[_Job]:
        """Take the next batch off the queue: queued steps in order, up to ``max_batch_tokens``
        rows (at least one step)."""
        batch: list[_Job] = []
        rows = 0
        while self._queue and (not batch or rows + self._queue[0].hidden.shape[0]
                               <= self.max_batch_tokens):
            job = self._queue.pop(0)
            job.taken = True
            batch.append(job)
            rows += job.hidden.shape[0]
        return batch

    async def _gather(self) -> None:
        """Wait up to ``window_s`` for the due sessions' steps, up to ``lockstep_s`` for those of
        the clients with a step queued; at once when none is due."""
        due, groups = self._due()
        if not due:  # nothing to wait for: no timer to set up
            return
        leader, entered = self._queue[0], trio.current_time()
        if leader.gathering_since is None:
            leader.gathering_since = entered
        start = leader.gathering_since  # (a lead that came back does not wait its window again)
        try:
            while due:
                queued = {j.group for j in self._queue} - {None}
                wait = self.lockstep_s if queued & groups else self._window_s()
                if trio.current_time() >= start + wait:
                    return
                with trio.move_on_at(start + wait):
                    self._arrival = trio.Event()
                    await self._arrival.wait()
                due, groups = self._due()
        finally:
            self.stats.gather_s += trio.current_time() - entered

    def _window_s(self) -> float:
        """How long the batch being gathered may wait (its leader is ``self._queue[0]``)."""
        return self.window_s

    @staticmethod
    def _compute(batch: list[_Job]) -> None:
        _compute_steps(batch)


class HeadBatcher(StepBatcher):
    """A client's LM head for its concurrent generations: rows that arrive while a batch computes
    (or within ``window_s``) go through the head together, in one matrix product, in a worker
    thread; a lone row (``inline_rows``) on the event loop, sparing the two thread hand-offs.

    *Waves.* ``decoding()`` says how many generations are decoding, per wave: the generations
    that follow one route (``logits(wave=)``, any hashable key). The first row of a wave's round
    waits up to ``window_s`` until every generation of that wave has its row queued, then those
    rows go through the head at once: they leave the head together, so their next steps reach
    each stage server of the route together and are batched there too (without this, concurrent
    streams drift apart and every server computes them one at a time). A batch holds one wave
    only: generations on different routes do not wait for each other, so while one wave is at
    the head (here) another is on its stage servers, and the client and the servers compute at
    the same time instead of taking turns. A wave whose rows are all queued goes first, even
    while the leader's wave still waits for a straggler. With one generation nothing waits."""

    def __init__(self, head: Head, limiter: trio.CapacityLimiter | None = None, *,
                 window_s: float = 0.0,
                 decoding: Callable[[], Mapping[Hashable, int]] = lambda: {},
                 inline_rows: int = 1) -> None:
        super().__init__(limiter or trio.CapacityLimiter(1), lambda: 0, window_s=window_s,
                         inline_rows=inline_rows)
        self.head = head
        self._decoding = decoding

    async def logits(self, hidden: np.ndarray, max_wait: float | None = None,
                     wave: Hashable = None) -> np.ndarray:
        """Logits ``[V]`` of the last row of ``hidden [T, H]``. ``max_wait`` caps how long this
        row waits for the others of its ``wave`` if it leads a batch (default: ``window_s``)."""
        return await self._submit(_Job(hidden[-1:], group=wave, max_wait=max_wait))

    def _due(self) -> tuple[int, set[Hashable]]:
        """The decoding generations of the leader's wave whose row is not queued yet; none once
        some wave has every row queued (it goes first: :meth:`_take`)."""
        if not self._queue or self._complete_wave():
            return 0, set()
        wave = self._queue[0].group
        queued = sum(1 for job in self._queue if job.group == wave)
        return max(0, self._decoding().get(wave, 0) - queued), set()

    def _complete_wave(self) -> list[Hashable]:
        """``[wave]``: the first wave (in queue order) with a row queued for each of its
        decoding generations; ``[]`` if none is."""
        decoding = self._decoding()
        queued: dict[Hashable, int] = {}
        for job in self._queue:
            queued[job.group] = queued.get(job.group, 0) + 1
        return [wave for wave, n in queued.items() if n >= decoding.get(wave, 0)][:1]

    def _take(self) -> list[_Job]:
        """Every queued row of one wave: the first complete one, else (the wait is over) the
        leader's."""
        complete = self._complete_wave()
        wave = complete[0] if complete else self._queue[0].group
        batch = [job for job in self._queue if job.group == wave]
        self._queue = [job for job in self._queue if job.group != wave]
        for job in batch:
            job.taken = True
        return batch

    def _window_s(self) -> float:
        leader = self._queue[0] if self._queue else None
        if leader is None or leader.max_wait is None:
            return self.window_s
        return max(0.0, min(self.window_s, leader.max_wait))

    def _compute(self, batch: list[_Job]) -> None:  # type: ignore[override]
        try:
            logits = self.head.logits(np.concatenate([job.hidden for job in batch]))  # [n, V]
        except Exception as e:
            for job in batch:
                job.error = e
            return
        for job, row in zip(batch, logits, strict=True):
            job.result = row


async def acquire(limiter: trio.CapacityLimiter) -> None:
    """``limiter.acquire()`` without a schedule point of its own when a token is free (the usual
    case on a decode step's path, where every pass of the scheduler costs): only a wait yields."""
    try:
        limiter.acquire_nowait()
    except trio.WouldBlock:
        await limiter.acquire()


def _compute_steps(batch: list[_Job]) -> None:
    """Worker thread: run each group of same-range steps as one ``forward_batch``. A step that
    does not fit gets its own error without spoiling the others (``forward_batch`` checks every
    step before changing any cache); an unexpected error fails only its group's steps."""
    groups: dict[tuple[int, int], list[_Job]] = {}
    for job in batch:
        groups.setdefault((_stage(job).start, _stage(job).end), []).append(job)
    for jobs in groups.values():
        try:
            try:
                steps = [(j.hidden, _cache(j), j.position) for j in jobs]
                outs: list[np.ndarray | None] = [*_stage(jobs[0]).forward_batch(steps)]
            except ModelInputError:
                if len(jobs) == 1:
                    raise
                outs = []
                for job in jobs:  # find the step that does not fit by running each alone
                    try:
                        outs.append(_stage(job).forward(job.hidden, _cache(job), job.position))
                    except ModelInputError as e:
                        job.error = e
                        outs.append(None)
        except Exception as e:
            for job in jobs:
                job.error = e
            continue
        for job, out in zip(jobs, outs, strict=True):
            job.result = out


def _stage(job: _Job) -> Stage:
    assert job.stage is not None  # StepBatcher.forward sets it
    return job.stage


def _cache(job: _Job) -> KVCache:
    assert job.cache is not None  # StepBatcher.forward sets it
    return job.cache
