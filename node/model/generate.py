"""The generation loop, independent of where the transformer blocks run.

:class:`Generation` is sans-IO: it hands out the hidden states to push through the blocks
(:meth:`Generation.next_input`) and takes back their output (:meth:`Generation.feed`), sampling
and stopping on its own. The client keeps the :class:`~idlefleet.node.model.stage.Head`; the "middle" can
be a local stage (:func:`local_middle`) or a chain of remote stages. :func:`generate` is the
synchronous driver; an async client writes the same five-line loop with ``await``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from idlefleet.node.model.kvcache import KVCache
from idlefleet.node.model.sampling import Sampler, SamplingParams
from idlefleet.node.model.stage import Head, Stage

# hidden [T, H] at positions position..position+T-1 -> hidden [T, H] after the last block
Middle = Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class StepInput:
    """Hidden states for the blocks: ``hidden [T, H]`` starting at ``position``."""

    hidden: np.ndarray
    position: int


@dataclass(frozen=True)
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int]
    stop_reason: str  # "stop_token" or "length"
    prefill_s: float  # prompt through the blocks up to the first token
    elapsed_s: float  # whole generation

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of the whole generation (prefill included)."""
        return len(self.new_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Generation:
    """State of one generation: prompt, new ids, sampler, and the next step's input."""

    def __init__(
        self,
        head: Head,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.head = head
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stop_ids = stop_ids
        self.new_ids: list[int] = []
        self.stop_reason: str | None = "length" if params.max_new_tokens == 0 else None
        self._sample = Sampler(params)
        self._pending = StepInput(head.embed(self.prompt_ids), 0)  # prefill: the whole prompt

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def next_input(self) -> StepInput:
        """What to run through the blocks next; raises RuntimeError once done."""
        if self.done:
            raise RuntimeError("generation is finished")
        return self._pending

    def feed(self, hidden: np.ndarray) -> int:
        """Take the blocks' output for :meth:`next_input`; sample, record and return a token."""
        step = self.next_input()
        if hidden.shape != step.hidden.shape:
            raise ValueError(f"blocks returned {hidden.shape}, expected {step.hidden.shape}")
        return self.feed_logits(self.head.logits(hidden[-1:])[0])

    def feed_logits(self, logits: np.ndarray) -> int:
        """Like :meth:`feed`, given the logits ``[V]`` of the step's last row (computed by the
        caller, e.g. for several generations in one matrix product)."""
        step = self.next_input()
        token = self._sample(logits)
        self.new_ids.append(token)
        if token in self.stop_ids:
            self.stop_reason = "stop_token"
        elif len(self.new_ids) >= self.params.max_new_tokens:
            self.stop_reason = "length"
        else:
            position = step.position + step.hidden.shape[0]
            self._pending = StepInput(self.head.embed([token]), position)
        return token


    def rewind(self, position: int) -> None:
        """Go back to the state before position ``position`` was run through the blocks: keep the
        ids ``[0, position]`` (prompt ids always stay) and run from ``position`` next. Used when the
        blocks' outputs from ``position`` on are found wrong. Raises ValueError if ``position`` was
        never run (there is nothing to rewind to there)."""
        ids = self.prompt_ids + self.new_ids
        if not 0 <= position <= len(ids) - 2:
            raise ValueError(f"cannot rewind to position {position} of {len(ids)} ids")
        prompt = len(self.prompt_ids)
        self.new_ids = self.new_ids[:max(0, position + 1 - prompt)]
        self.stop_reason = None
        if position < prompt:
            self._pending = StepInput(self.head.embed(self.prompt_ids[position:]), position)
        else:
            self._pending = StepInput(self.head.embed([ids[position]]), position)


def local_middle(stage: Stage, cache: KVCache) -> Middle:
    """A middle that runs ``stage`` (all blocks) in this process with ``cache``."""
    return lambda hidden, position: stage.forward(hidden, cache, position)


def generate(
    head: Head,
    middle: Middle,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    stop_ids: frozenset[int] = frozenset(),
    on_token: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Generate synchronously, calling ``on_token`` with each new id as soon as it is sampled."""
    gen = Generation(head, prompt_ids, params, stop_ids)
    t0 = time.perf_counter()
    prefill_s = 0.0
    while not gen.done:
        step = gen.next_input()
        token = gen.feed(middle(step.hidden, step.position))
        if len(gen.new_ids) == 1:
            prefill_s = time.perf_counter() - t0
        if on_token is not None:
            on_token(token)
    return GenerationResult(
        prompt_ids=gen.prompt_ids,
        new_ids=gen.new_ids,
        stop_reason=gen.stop_reason or "length",
        prefill_s=prefill_s,
        elapsed_s=time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class BatchItem:
    """One prompt of a batch job: ``key`` comes back with its result."""

    key: object
    prompt_ids: Sequence[int]
    params: SamplingParams


def generate_many(
    head: Head,
    stage: Stage,
    items: Iterable[BatchItem],
    stop_ids: frozenset[int] = frozenset(),
    concurrency: int = 8,
) -> Iterator[tuple[object, GenerationResult]]:
    """Generate every item locally, up to ``concurrency`` at a time, yielding ``(key, result)``
    as each finishes (continuous batching: a finished generation's slot is refilled at once).

    Each round runs one step of every active generation through :meth:`Stage.forward_batch` and
    their last rows through the LM head in one matrix product, so the weights are read once per
    round, not once per generation. Greedy tokens equal :func:`generate`'s (docs/MODEL.md).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    pending = iter(items)
    active: list[tuple[BatchItem, Generation, KVCache, float, list[float]]] = []
    while True:
        while len(active) < concurrency and (item := next(pending, None)) is not None:
            gen = Generation(head, item.prompt_ids, item.params, stop_ids)
            if gen.done:  # max_new_tokens == 0
                yield item.key, GenerationResult(gen.prompt_ids, [], "length", 0.0, 0.0)
                continue
            cache = stage.new_cache(capacity=len(item.prompt_ids) + item.params.max_new_tokens)
            active.append((item, gen, cache, time.perf_counter(), []))
        if not active:
            return
        steps = [(gen.next_input(), cache) for _, gen, cache, _, _ in active]
        outs = stage.forward_batch([(s.hidden, cache, s.position) for s, cache in steps])
        logits = head.logits(np.concatenate([out[-1:] for out in outs]))  # [sessions, V]
        still = []
        for (item, gen, cache, t0, prefill), row in zip(active, logits, strict=True):
            gen.feed_logits(row)
            if not prefill:
                prefill.append(time.perf_counter() - t0)
            if not gen.done:
                still.append((item, gen, cache, t0, prefill))
                continue
            yield item.key, GenerationResult(
                prompt_ids=gen.prompt_ids, new_ids=gen.new_ids,
                stop_reason=gen.stop_reason or "length", prefill_s=prefill[0],
                elapsed_s=time.perf_counter() - t0)
        active = still
