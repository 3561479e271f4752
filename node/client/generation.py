"""One generation across the fleet: the sampling loop (``node/model/generate.py``) over a
``Pipeline``, with the head's lockstep (waves), verification behind the tokens, and rollbacks on
the verifier's verdicts (``Verifier.verdicts``: events the loop takes, not fields it polls)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Hashable
from typing import TYPE_CHECKING

import trio

from idlefleet.node.client.config import FleetResult, GenerationFailed
from idlefleet.node.client.pipeline import Pipeline
from idlefleet.node.model.generate import Generation
from idlefleet.node.model.sampling import SamplingParams
from idlefleet.node.model.tokenizer import TextStream

if TYPE_CHECKING:
    from idlefleet.node.client.fleet import FleetClient

LOCKSTEP_SHARE = 0.25  # of a generation's time per token, the most its head row waits for others


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
        pipeline = self.pipeline = Pipeline(client, len(self.prompt_ids) + max(1, self.params.max_new_tokens),
                                            strict=self.strict)
        verifier = pipeline.verifier
        strict = self.strict and verifier is not None
        released = rollbacks = 0
        rollback_to: int | None = None  # the earliest position a verdict asks to roll back to

        def take_verdicts() -> int | None:
            if verifier is None:
                return None
            return min([*([] if rollback_to is None else [rollback_to]),
                        *(v.position for v in verifier.verdicts())], default=None)

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
                rollback_to = take_verdicts()
                if rollback_to is not None:
                    rollbacks += 1
                    if rollbacks > client.config.max_failovers:
                        raise GenerationFailed("too many rollbacks: wrong outputs keep coming")
                    await pipeline.rollback(gen, rollback_to)
                    rollback_to = None
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
                    rollback_to = take_verdicts()
                    if rollback_to is not None:
                        continue
                    finished = True
                ready = len(gen.new_ids)
                if strict and not finished and verifier is not None:
                    frontier = verifier.frontier()
                    rollback_to = take_verdicts()
                    if rollback_to is not None:
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
            verification = verifier.finish(len(self.prompt_ids) + len(gen.new_ids), len(self.prompt_ids))
        stats = pipeline.statistics()
        self.result = FleetResult(
            prompt_ids=self.prompt_ids, new_ids=gen.new_ids,
            text=client.model.tokenizer.decode(gen.new_ids, skip_special=True),
            tokens_per_s=len(gen.new_ids) / elapsed if elapsed > 0 else 0.0,
            route=pipeline.route, failovers=stats.failovers,
            stop_reason=gen.stop_reason or "length", verification=verification,
            chained_steps=stats.chained, chain_failures=stats.chain_failures)

