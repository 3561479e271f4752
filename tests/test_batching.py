"""Batched multi-session forward: stacked sessions equal each session run alone.

Tolerance (docs/MODEL.md): a stacked matrix product may sum in a different order than a lone
one, so hidden states agree to within ``TOL`` of the step's largest magnitude; greedy tokens are
identical on the reference prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from idlefleet.node.model.generate import BatchItem, generate, generate_many, local_middle
from idlefleet.node.model.kvcache import KVCache
from idlefleet.node.model.sampling import SamplingParams
from idlefleet.node.model.stage import Head, Stage
from idlefleet.protocols.errors import TensorError

TOL = 2e-5  # of max |hidden| of the step


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * float(np.abs(want).max()))


def test_stacked_steps_equal_lone_steps_for_mixed_lengths_joining_and_leaving(
    head: Head, whole_model: Stage
) -> None:
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 49152, n).tolist() for n in (5, 17, 1, 40)]
    alone = [whole_model.new_cache() for _ in prompts]
    stacked = [whole_model.new_cache() for _ in prompts]
    # Rounds of (session, tokens): prefills of different lengths mixed with decode steps;
    # session 3 joins late, session 0 leaves early, session 1 sends a 6-token chunk mid-way.
    rounds = [[(0, None), (1, None)], [(0, 1), (1, 1), (2, None)], [(1, 6), (2, 1), (3, None)],
              [(1, 1), (2, 1), (3, 1)], [(3, 1)]]
    for step in rounds:
        xs = [head.embed(prompts[i] if n is None else rng.integers(0, 49152, n).tolist())
              for i, n in step]
        want = [whole_model.forward(x, alone[i]) for x, (i, _) in zip(xs, step, strict=True)]
        got = whole_model.forward_batch([(x, stacked[i], None) for x, (i, _) in zip(xs, step, strict=True)])
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
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
    with pytest.raises(TensorError, match="skips ahead"):
        whole_model.forward_batch([(x, good, None), (x, bad, 5)])
    assert (good.length, bad.length) == (2, 0)
    with pytest.raises(TensorError, match="twice"):
        whole_model.forward_batch([(x, good, None), (x, good, None)])
    bad.max_len = 1
    with pytest.raises(TensorError, match="exceeds the context"):
        whole_model.forward_batch([(x, good, None), (head.embed([1, 2]), bad, 0)])
    assert (good.length, bad.length) == (2, 0)


@pytest.mark.parametrize("concurrency", [2, 4])
def test_continuous_batching_gives_the_same_greedy_tokens(
    head: Head, whole_model: Stage, hf_reference: dict[str, Any], concurrency: int
) -> None:
    """Four reference prompts of 5..121 tokens with different lengths to generate: sessions
    join as others finish (concurrency 2) or all start together and leave at different steps."""
    eos = frozenset({hf_reference["eos_token_id"]})
    items = [BatchItem(i, case["prompt_ids"], SamplingParams(max_new_tokens=n))
             for i, (case, n) in enumerate(zip(hf_reference["greedy"], (12, 5, 8, 3), strict=True))]
    got = dict(generate_many(head, whole_model, items, eos, concurrency=concurrency))
    assert sorted(got) == [0, 1, 2, 3]
    for item in items:
        cache: KVCache = whole_model.new_cache()
        want = generate(head, local_middle(whole_model, cache), item.prompt_ids, item.params, eos)
        assert got[item.key].new_ids == want.new_ids
        assert got[item.key].new_ids == hf_reference["greedy"][item.key]["new_ids"][: len(want.new_ids)]


def test_generate_many_handles_zero_tokens_and_rejects_bad_concurrency(
    head: Head, whole_model: Stage
) -> None:
    items = [BatchItem("a", [504, 3575], SamplingParams(max_new_tokens=0))]
    assert [(k, r.new_ids) for k, r in generate_many(head, whole_model, items)] == [("a", [])]
    with pytest.raises(ValueError, match="concurrency"):
        list(generate_many(head, whole_model, items, concurrency=0))
