"""Batched multi-session forward: stacked sessions equal each session run alone.

Tolerance (docs/MODEL.md): a stacked matrix product may sum in a different order than a lone
one, so hidden states agree to within ``TOL`` of the step's largest magnitude; greedy tokens are
identical on the reference prompts.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from idlefleet.node.model import blocks as B
from idlefleet.node.model.batcher import STEPPING_S, HeadBatcher, StepBatcher, acquire
from idlefleet.node.model.generate import BatchItem, generate_many
from idlefleet.node.model.kvcache import KVCache
from idlefleet.node.model.sampling import SamplingParams
from idlefleet.node.model.stage import Head, Stage
from idlefleet.protocols.errors import ModelInputError

TOL = 2e-5  # of max |hidden| of the step


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * float(np.abs(want).max()))


def test_small_batch_products_take_weight_slices_and_equal_the_plain_product(
    head: Head, whole_model: Stage
) -> None:
    w = whole_model.blocks[0]
    # the slice widths: the widest divisor <= 64 (a multiple of 16) within the small-kernel bounds
    assert B._small_chunk(1, 3072, 576) == 0  # one row: matrix-vector product
    assert B._small_chunk(8, 3072, 576) == 64 and B._small_chunk(8, 576, 1536) == 64
    assert B._small_chunk(16, 576, 1536) == 32  # 16 x 64 x 1536 > 1e6
    assert B._small_chunk(33, 3072, 576) == 0  # many rows: the packed product wins
    assert B._small_chunk(8, 40, 576) == 0  # no slice width divides 40
    rng = np.random.default_rng(3)
    for rows in (2, 3, 8, 17, 32):
        for m in (w.wqkv, w.wo, w.w_gate_up, w.w_down, head.lm_head):
            x = rng.standard_normal((rows, m.shape[1])).astype(np.float32)
            got = B.matmul(x, m)
            assert got.shape == (rows, m.shape[0]) and got.dtype == np.float32
            want = (x.astype(np.float64) @ m.T.astype(np.float64))
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_stacked_steps_equal_lone_steps_for_mixed_lengths_joining_and_leaving(
    head: Head, whole_model: Stage
) -> None:
    stage = whole_model.sub_stage(0, 6)  # enough blocks to carry rounding through; cheaper
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 49152, n).tolist() for n in (5, 17, 1, 40)]
    alone = [stage.new_cache() for _ in prompts]
    stacked = [stage.new_cache() for _ in prompts]
    # Rounds of (session, tokens): prefills of different lengths mixed with decode steps;
    # session 3 joins late, session 0 leaves early, session 1 sends a 6-token chunk mid-way.
    rounds = [[(0, None), (1, None)], [(0, 1), (1, 1), (2, None)], [(1, 6), (2, 1), (3, None)],
              [(1, 1), (2, 1), (3, 1)], [(3, 1)]]
    for step in rounds:
        xs = [head.embed(prompts[i] if n is None else rng.integers(0, 49152, n).tolist())
              for i, n in step]
        want = [stage.forward(x, alone[i]) for x, (i, _) in zip(xs, step, strict=True)]
        got = stage.forward_batch([(x, stacked[i], None) for x, (i, _) in zip(xs, step, strict=True)])
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            _close(g, w)
    for a, b in zip(alone, stacked, strict=True):
        assert a.length == b.length
        _close(b.k[:, :, : b.length], a.k[:, :, : a.length])
        _close(b.v[:, :, : b.length], a.v[:, :, : a.length])


def test_decode_rows_share_one_padded_attention_equal_to_per_session_attention(
    head: Head, whole_model: Stage
) -> None:
    """All-decode batches (one row per session) take the padded attention while every cache is
    shorter than MAX_PADDED_KEYS; one longer session sends the batch down the per-session loop.
    Both equal each session's lone forward, caches included."""
    stage = whole_model.sub_stage(0, 3)
    rng = np.random.default_rng(11)
    for lengths in ((0, 1, 7, 30), (3, B.MAX_PADDED_KEYS + 4)):
        alone = [stage.new_cache() for _ in lengths]
        stacked = [stage.new_cache() for _ in lengths]
        for n, a, b in zip(lengths, alone, stacked, strict=True):
            if n:
                x = head.embed(rng.integers(0, 49152, n).tolist())
                stage.forward(x, a)
                stage.forward(x, b)
        for _ in range(2):
            xs = [head.embed([int(t)]) for t in rng.integers(0, 49152, len(lengths))]
            want = [stage.forward(x, c) for x, c in zip(xs, alone, strict=True)]
            got = stage.forward_batch([(x, c, None) for x, c in zip(xs, stacked, strict=True)])
            for g, w in zip(got, want, strict=True):
                _close(g, w)
        for a, b in zip(alone, stacked, strict=True):
            assert a.length == b.length
            _close(b.k[:, :, : b.length], a.k[:, :, : a.length])
            _close(b.v[:, :, : b.length], a.v[:, :, : a.length])


def test_one_step_batch_is_exactly_forward(head: Head, whole_model: Stage) -> None:
    x = head.embed([504, 3575, 282])
    (got,) = whole_model.forward_batch([(x, whole_model.new_cache(), 0)])
    assert np.array_equal(got, whole_model.forward(x, whole_model.new_cache()))


def test_a_bad_step_fails_the_batch_before_any_cache_changes(head: Head, whole_model: Stage) -> None:
    good, bad = whole_model.new_cache(), whole_model.new_cache()
    whole_model.forward(head.embed([504, 3575]), good)
    x = head.embed([4649])
    with pytest.raises(ModelInputError, match="skips ahead"):
        whole_model.forward_batch([(x, good, None), (x, bad, 5)])
    assert (good.length, bad.length) == (2, 0)
    with pytest.raises(ModelInputError, match="twice"):
        whole_model.forward_batch([(x, good, None), (x, good, None)])
    bad.max_len = 1
    with pytest.raises(ModelInputError, match="exceeds the context"):
        whole_model.forward_batch([(x, good, None), (head.embed([1, 2]), bad, 0)])
    assert (good.length, bad.length) == (2, 0)


def test_continuous_batching_gives_the_same_greedy_tokens(
    head: Head, whole_model: Stage, hf_reference: dict[str, Any]
) -> None:
    """Four reference prompts of 5..121 tokens, three at a time, with different numbers of
    tokens to generate: sessions leave at different steps and the fourth joins mid-batch."""
    eos = frozenset({hf_reference["eos_token_id"]})
    items = [BatchItem(i, case["prompt_ids"], SamplingParams(max_new_tokens=n))
             for i, (case, n) in enumerate(zip(hf_reference["greedy"], (6, 3, 8, 2), strict=True))]
    got = dict(generate_many(head, whole_model, items, eos, concurrency=3))
    assert sorted(got) == [0, 1, 2, 3]
    for item in items:  # test_model.py proves unbatched greedy equals these reference ids
        want = hf_reference["greedy"][item.key]["new_ids"][: item.params.max_new_tokens]
        assert got[item.key].new_ids == want


def test_generate_many_handles_zero_tokens_and_rejects_bad_concurrency(
    head: Head, whole_model: Stage
) -> None:
    items = [BatchItem("a", [504, 3575], SamplingParams(max_new_tokens=0))]
    assert [(k, r.new_ids) for k, r in generate_many(head, whole_model, items)] == [("a", [])]
    with pytest.raises(ValueError, match="concurrency"):
        list(generate_many(head, whole_model, items, concurrency=0))


# -- the stage server's batcher -----------------------------------------------------------------
def _batcher(active: int, window_s: float) -> StepBatcher:
    return StepBatcher(trio.CapacityLimiter(1), lambda: active, window_s=window_s)


@pytest.fixture(scope="module")
def two_blocks(whole_model: Stage) -> Stage:
    return whole_model.sub_stage(4, 6)


async def test_a_lone_session_never_waits_for_the_window(
    two_blocks: Stage, autojump_clock: trio.abc.Clock
) -> None:
    batcher = _batcher(active=1, window_s=1000.0)
    cache = two_blocks.new_cache()
    x = np.random.default_rng(1).standard_normal((3, 576)).astype(np.float32)
    t0 = trio.current_time()
    got = await batcher.forward(two_blocks, x, cache, 0)
    assert trio.current_time() - t0 < 1.0  # virtual time: no wait at all
    np.testing.assert_array_equal(got, two_blocks.forward(x, two_blocks.new_cache()))
    assert (batcher.stats.batches, batcher.stats.max_batch) == (1, 1)


async def test_steps_of_all_active_sessions_are_computed_together_and_errors_stay_apart(
    two_blocks: Stage, autojump_clock: trio.abc.Clock
) -> None:
    rng = np.random.default_rng(2)
    n = 4
    batcher = _batcher(active=n, window_s=1000.0)
    caches = [two_blocks.new_cache() for _ in range(n)]
    xs = [rng.standard_normal((k, 576)).astype(np.float32) for k in (1, 4, 2, 7)]
    got: dict[int, Any] = {}

    async def one(i: int, position: int) -> None:
        try:
            got[i] = await batcher.forward(two_blocks, xs[i], caches[i], position)
        except ModelInputError as e:
            got[i] = e

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(n):  # session 3 skips ahead: only its step fails
            nursery.start_soon(one, i, 5 if i == 3 else 0)
    assert trio.current_time() - t0 < 1.0  # the window ended when all 4 were queued
    assert (batcher.stats.batches, batcher.stats.max_batch) == (1, 4)
    for i in range(3):
        _close(got[i], two_blocks.forward(xs[i], two_blocks.new_cache()))
    assert isinstance(got[3], ModelInputError)
    assert caches[3].length == 0


async def test_window_is_bounded_and_a_cancelled_waiter_leaves_the_queue(
    two_blocks: Stage, autojump_clock: trio.abc.Clock
) -> None:
    batcher = _batcher(active=3, window_s=0.002)
    x = np.ones((1, 576), np.float32)
    t0 = trio.current_time()
    await batcher.forward(two_blocks, x, two_blocks.new_cache(), 0)  # the others never come
    assert 0.002 <= trio.current_time() - t0 < 0.01
    done: list[int] = []

    async def one(i: int, cancel_after: float | None) -> None:
        with trio.move_on_after(cancel_after if cancel_after is not None else 1e9):
            await batcher.forward(two_blocks, x, two_blocks.new_cache(), 0)
            done.append(i)

    async with trio.open_nursery() as nursery:  # the leader's batch starts after the window;
        nursery.start_soon(one, 0, None)  # step 1 is cancelled in the queue before that
        await trio.lowlevel.checkpoint()  # step 0 queues first and leads (tasks start in any order)
        nursery.start_soon(one, 1, 0.001)
    assert done == [0]
    assert batcher.stats.steps == 2
    assert not batcher._queue


async def test_an_open_session_that_stopped_stepping_does_not_hold_batches_up(
    two_blocks: Stage, autojump_clock: trio.abc.Clock
) -> None:
    batcher = _batcher(active=2, window_s=0.5)  # two sessions open
    x = np.ones((1, 576), np.float32)
    silent, busy = two_blocks.new_cache(), two_blocks.new_cache()
    await batcher.forward(two_blocks, x, silent, None)  # the first steps once, then goes quiet
    t0 = trio.current_time()
    await batcher.forward(two_blocks, x, busy, None)  # it stepped just now: waited for
    assert trio.current_time() - t0 >= 0.5
    await trio.sleep(STEPPING_S)
    for _ in range(3):  # silent for a while: the other's steps go at once
        t0 = trio.current_time()
        await batcher.forward(two_blocks, x, busy, None)
        assert trio.current_time() - t0 < 0.01
    batcher.forget(silent)  # its session closed
    # (active() still says 2 here: a new session, not stepped yet, is due; busy just stepped and
    # is not due again before half its usual interval)
    assert batcher._due() == (1, {None})


async def _steps_at(batcher: StepBatcher, stage: Stage, plan: list[tuple[float, KVCache, str]],
                    t0: float) -> None:
    """Submit one-row steps at virtual times ``t0 + offset`` (each of its cache, as ``group``)."""
    x = np.ones((1, 576), np.float32)

    async def one(offset: float, cache: KVCache, group: str) -> None:
        await trio.sleep_until(t0 + offset)
        await batcher.forward(stage, x, cache, None, group)

    async with trio.open_nursery() as nursery:
        for offset, cache, group in plan:
            nursery.start_soon(one, offset, cache, group)


async def test_steps_of_one_clients_sessions_wait_the_lockstep_window_others_the_short_one(
    two_blocks: Stage, autojump_clock: trio.abc.Clock
) -> None:
    """A client's generations step in lockstep: the second of its steps, 20 ms late, still joins
    the first's batch (lockstep window 50 ms); another client's step 20 ms late does not (window
    5 ms), and its session is not waited for beyond that window."""
    batcher = StepBatcher(trio.CapacityLimiter(1), lambda: 3, window_s=0.005, lockstep_s=0.05)
    a1, a2, b = (two_blocks.new_cache() for _ in range(3))
    t0 = trio.current_time()
    await _steps_at(batcher, two_blocks, [(0.0, a1, "a"), (0.0, a2, "a"), (0.0, b, "b")], t0)
    assert batcher.stats.batches == 1  # every session had its first step queued: no wait
    # Round two, one interval (1 s) later: a1 first, a2 20 ms after it, b 20 ms after that.
    before = batcher.stats.batches
    await _steps_at(batcher, two_blocks, [(1.0, a1, "a"), (1.02, a2, "a"), (1.04, b, "b")], t0)
    assert batcher.stats.batches - before == 2  # {a1, a2} waited for together, b alone
    # Round three: b first; a1 and a2 20 ms later are another client: b waits 5 ms only. (Not a
    # full interval after round two: a2 would then have stepped STEPPING_S = 1 s ago, on the edge
    # of being due, and float rounding decided whether a1 waited for it: 1 run in 4 failed.)
    before = batcher.stats.batches
    await _steps_at(batcher, two_blocks, [(1.9, b, "b"), (1.92, a1, "a"), (1.92, a2, "a")], t0)
    assert batcher.stats.batches - before == 2


async def test_a_session_that_steps_once_per_window_is_not_waited_for_right_after_its_step(
    two_blocks: Stage, autojump_clock: trio.abc.Clock
) -> None:
    """A verifier's session steps every few seconds; a decode session steps every 0.2 s. Right
    after the verifier's step, the decoder's steps do not wait for it (it is due again only half
    its interval later), though it stepped within STEPPING_S."""
    batcher = StepBatcher(trio.CapacityLimiter(1), lambda: 2, window_s=0.5, lockstep_s=0.5)
    verifier, decoder = two_blocks.new_cache(), two_blocks.new_cache()
    x = np.ones((1, 576), np.float32)
    t0 = trio.current_time()
    await _steps_at(batcher, two_blocks, [(0.0, verifier, "a"), (0.0, decoder, "a")], t0)
    await _steps_at(batcher, two_blocks, [(3.0, verifier, "a"), (3.0, decoder, "a")], t0)
    for k in range(1, 4):  # 3.2, 3.4, 3.6: the verifier stepped < 1 s ago, but is not due
        await trio.sleep_until(t0 + 3.0 + 0.2 * k)
        started = trio.current_time()
        await batcher.forward(two_blocks, x, decoder, None, "a")
        assert trio.current_time() - started < 0.01


async def test_client_head_rows_queued_during_a_batch_go_through_the_head_together(head: Head) -> None:
    batcher = HeadBatcher(head, inline_rows=0)  # (a lone row would be computed on the loop)
    rows = np.random.default_rng(3).standard_normal((3, 2, 576)).astype(np.float32)
    got: dict[int, np.ndarray] = {}

    async def one(i: int) -> None:
        got[i] = await batcher.logits(rows[i])

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(one, i)
    # The first row leads at once (no window); the other two queue while it computes.
    assert (batcher.stats.batches, batcher.stats.max_batch) == (2, 2)
    want = head.logits(rows[:, -1])
    for i in range(3):
        np.testing.assert_allclose(got[i], want[i], rtol=0, atol=TOL * float(np.abs(want[i]).max()))


async def test_client_head_waits_for_every_decoding_generation_within_the_window(
    head: Head, autojump_clock: trio.abc.Clock
) -> None:
    decoding = 3
    batcher = HeadBatcher(head, window_s=0.05, decoding=lambda: {None: decoding})
    row = np.random.default_rng(4).standard_normal((1, 576)).astype(np.float32)
    arrived: dict[int, float] = {}

    async def one(i: int, delay: float) -> None:
        await trio.sleep(delay)
        await batcher.logits(row)
        arrived[i] = trio.current_time()

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:  # rows 10 and 30 ms apart: one batch at 30 ms
        for i, delay in enumerate((0.0, 0.01, 0.03)):
            nursery.start_soon(one, i, delay)
    assert (batcher.stats.batches, batcher.stats.max_batch) == (1, 3)
    assert all(abs(t - t0 - 0.03) < 0.005 for t in arrived.values()), arrived
    # A straggler past the window: the others go without it (the wait is bounded), it alone.
    async with trio.open_nursery() as nursery:
        for i, delay in enumerate((0.0, 0.0, 0.2)):
            nursery.start_soon(one, i, delay)
    assert batcher.stats.batches == 3 and arrived[0] == arrived[1] < arrived[2]
    # A leader's own cap (a fast generation: a share of its time per token) shortens the wait.
    waited: list[float] = []

    async def capped() -> None:
        t = trio.current_time()
        await batcher.logits(row, max_wait=0.01)
        waited.append(trio.current_time() - t)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(capped)
        nursery.start_soon(one, 0, 0.03)
    # (its window ended at 10 ms: the row at 30 ms came too late and went alone; with the
    # default window both would have gone together)
    assert waited[0] >= 0.01 and batcher.stats.batches == 5
    # One generation decoding: its row never waits.
    decoding = 1
    t0, inline = trio.current_time(), batcher.stats.inline
    await batcher.logits(row)
    assert trio.current_time() - t0 < 0.001
    assert batcher.stats.inline == inline + 1  # a lone row: on the event loop, no thread


async def test_client_head_lockstep_is_per_wave(head: Head, autojump_clock: trio.abc.Clock) -> None:
    # Two generations on route "a", two on route "b": a wave waits for its own generations only,
    # and a batch holds one wave (so the waves go through the servers in turn, not together).
    waves = {"a": 2, "b": 2}
    # (computed on the event loop: a worker thread would let the virtual clock jump meanwhile)
    batcher = HeadBatcher(head, window_s=0.05, decoding=lambda: waves, inline_rows=4)
    rows = np.random.default_rng(5).standard_normal((4, 1, 576)).astype(np.float32)
    alone = [head.logits(r)[0] for r in rows]
    arrived: dict[int, float] = {}
    got: dict[int, np.ndarray] = {}

    async def one(i: int, wave: str, delay: float) -> None:
        await trio.sleep(delay)
        got[i] = await batcher.logits(rows[i], wave=wave)
        arrived[i] = trio.current_time()

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i, (wave, delay) in enumerate((("a", 0.0), ("b", 0.001), ("a", 0.01), ("b", 0.04))):
            nursery.start_soon(one, i, wave, delay)
    assert abs(arrived[0] - t0 - 0.01) < 0.005 and arrived[0] == arrived[2]  # "a" did not wait for "b"
    assert abs(arrived[1] - t0 - 0.04) < 0.005 and arrived[1] == arrived[3]
    assert (batcher.stats.batches, batcher.stats.max_batch) == (2, 2)
    for i in range(4):  # batched rows: the same logits as alone, up to float32 summation order
        np.testing.assert_allclose(got[i], alone[i], rtol=1e-4, atol=1e-4)
    # A complete wave does not wait behind a leader whose wave waits for a straggler: "a" leads
    # at 0 and waits for its second row (at 40 ms); "b", complete at 5 ms, goes at 5 ms.
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i, (wave, delay) in enumerate((("a", 0.0), ("b", 0.002), ("a", 0.04), ("b", 0.005))):
            nursery.start_soon(one, i, wave, delay)
    assert abs(arrived[1] - t0 - 0.005) < 0.002 and arrived[1] == arrived[3]
    assert abs(arrived[0] - t0 - 0.04) < 0.005 and arrived[0] == arrived[2]
    assert (batcher.stats.batches, batcher.stats.max_batch) == (4, 2)
    # A wave's queued rows are never taken into another wave's batch, even when both are queued.
    waves = {"a": 1, "b": 1}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 0, "a", 0.0)
        nursery.start_soon(one, 1, "b", 0.0)
    assert batcher.stats.batches == 6 and batcher.stats.steps == 10


class _ThreadRecordingStage:
    """Wraps a stage: records the thread each ``forward_batch`` runs in, and how many rows."""

    def __init__(self, stage: Stage) -> None:
        self.stage, self.start, self.end = stage, stage.start, stage.end
        self.calls: list[tuple[int, int]] = []  # (thread id, rows)

    def forward_batch(self, steps: Any) -> list[np.ndarray]:
        self.calls.append((threading.get_ident(), sum(h.shape[0] for h, _, _ in steps)))
        return self.stage.forward_batch(steps)


async def test_a_lone_one_row_step_is_computed_on_the_event_loop_under_the_limiter(two_blocks: Stage) -> None:
    limiter = trio.CapacityLimiter(1)
    batcher = StepBatcher(limiter, lambda: 1, window_s=0.0, inline_rows=1)
    stage = _ThreadRecordingStage(two_blocks)
    cache, alone = two_blocks.new_cache(), two_blocks.new_cache()
    rng = np.random.default_rng(4)
    prefill = rng.standard_normal((3, 576)).astype(np.float32)
    decode = rng.standard_normal((1, 576)).astype(np.float32)
    loop = threading.get_ident()
    got = await batcher.forward(stage, prefill, cache, 0)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got, two_blocks.forward(prefill, alone))
    got = await batcher.forward(stage, decode, cache, 3)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got, two_blocks.forward(decode, alone))
    assert stage.calls[0][0] != loop  # 3 rows: a worker thread
    assert stage.calls[1] == (loop, 1)  # 1 row: on the event loop, same result
    assert batcher.stats.inline == 1
    # The limiter still orders it: while someone else computes, the inline step waits its turn.
    other = object()
    await limiter.acquire_on_behalf_of(other)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.forward, stage, decode, cache, 4)
        await trio.sleep(0.05)
        assert len(stage.calls) == 2  # still waiting for the limiter
        limiter.release_on_behalf_of(other)
    assert stage.calls[2] == (loop, 1) and cache.length == 5


async def test_inline_rows_zero_always_uses_the_thread(two_blocks: Stage) -> None:
    batcher = StepBatcher(trio.CapacityLimiter(1), lambda: 1, window_s=0.0)  # the default: 0
    stage = _ThreadRecordingStage(two_blocks)
    x = np.ones((1, 576), np.float32)
    await batcher.forward(stage, x, two_blocks.new_cache(), 0)  # type: ignore[arg-type]
    assert stage.calls[0][0] != threading.get_ident()
    assert batcher.stats.inline == 0


async def test_acquire_takes_a_free_token_without_a_schedule_point_and_waits_for_a_taken_one() -> None:
    limiter = trio.CapacityLimiter(1)
    with trio.testing.assert_no_checkpoints():
        await acquire(limiter)
    assert limiter.borrowed_tokens == 1
    got: list[str] = []

    async def second() -> None:
        await acquire(limiter)
        got.append("second")
        limiter.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.sleep(0.01)
        assert got == []  # waits for the token
        limiter.release()
    assert got == ["second"] and limiter.borrowed_tokens == 0
