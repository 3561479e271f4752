"""What verified work costs (issue 11).

- A hop session is drawn once (at its first window): a sampled one has every window checked, the
  others none, so a trusted peer costs the sampling rate in re-computed positions.
- The check of a window that ends just before the generation's last position waits for the last
  (partial) window, so both go as one step instead of a second step of a few rows."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from idlefleet.node.client import verifier as V
from idlefleet.node.client.config import ClientConfig
from idlefleet.protocols.verification import TrustBook

PEER = "12D3KooWprimary"
WINDOW = 16


class NoTasks:
    """A nursery stand-in: the verifier's background check is not run (only what it is asked)."""

    def start_soon(self, *args: Any) -> None:
        pass


class Always(TrustBook):
    """Every session sampled, or none."""

    def __init__(self, sample: bool) -> None:
        super().__init__()
        self.sample = sample

    def should_check(self, peer: str) -> bool:
        return self.sample


def verifier(max_length: int, *, sample: bool = True, strict: bool = False) -> V.Verifier:
    client = SimpleNamespace(config=ClientConfig(verify_window=WINDOW), trust=Always(sample),
                             node=SimpleNamespace(nursery=NoTasks()))
    return V.Verifier(client, None, max_length, strict=strict)  # type: ignore[arg-type]


def hop_session(start: int, end: int) -> Any:
    """A primary hop session, as far as the verifier's bookkeeping looks at it."""
    return SimpleNamespace(peer_id=PEER, start=start, end=end)


def step(position: int, rows: int) -> Any:
    return SimpleNamespace(position=position, inputs=np.zeros((rows, 4), np.float32))


def generate(v: V.Verifier, hop: Any, prompt: int, upto: int) -> V.HopCheck:
    """The hop returns the prompt's step, then one-row decode steps until position ``upto``."""
    v.record(hop, step(0, prompt))
    for position in range(prompt, upto):
        v.record(hop, step(position, 1))
    check = v.check_of(hop)
    assert isinstance(check, V.HopCheck)
    return check


@pytest.mark.parametrize("strict", [False, True])
async def test_the_window_before_a_short_last_one_is_checked_with_it(strict: bool) -> None:
    # 6 prompt positions + 32 new tokens: the hops compute positions [0, 37); windows end at 16
    # and 32, and [32, 37) is the short last one.
    v = verifier(6 + 32, strict=strict)
    hop = hop_session(10, 20)
    check = generate(v, hop, 6, 16)
    assert check.due == 16  # a full window with a full one still to come: asked at once
    for position in range(16, 37):
        v.record(hop, step(position, 1))
    if strict:  # tokens wait for their checks: nothing is held back
        assert (check.due, check.deferred) == (32, 0)
    else:
        assert (check.due, check.deferred) == (16, 32)
    await v.flush(everything=False, timeout=0.01)  # the generation ends: one step asks for [16, 37)
    assert (check.due, check.deferred) == (37, 0)


async def test_a_shadowed_session_checks_every_window_whatever_the_trust_book_says_later() -> None:
    v = verifier(6 + 32)
    hop = hop_session(10, 20)
    check = generate(v, hop, 6, 37)
    assert (check.due, check.deferred, check.sample) == (16, 32, V.Sample.SHADOWED)
    v.client.trust.sample = False  # type: ignore[attr-defined]  # drawn once, at the first window
    await v.flush(everything=False, timeout=0.01)
    assert check.due == 37
    assert (v.stats.sessions_shadowed, v.stats.sessions_skipped) == (1, 0)


async def test_a_session_not_sampled_asks_for_nothing_from_start_to_retirement() -> None:
    """The cost of a trusted peer is the sampling rate: a session that was not drawn re-computes
    nothing, not its windows, not its last one, not when it leaves the route."""
    v = verifier(6 + 64, sample=False)
    hop = hop_session(10, 20)
    check = generate(v, hop, 6, 50)
    assert (check.due, check.deferred, check.sample) == (0, 0, V.Sample.SKIPPED)
    v.client.trust.sample = True  # type: ignore[attr-defined]  # later draws do not change it
    v.retire(hop)
    await v.flush(everything=False, timeout=0.01)
    assert check.due == 0 and not check.finished
    assert (v.stats.sessions_shadowed, v.stats.sessions_skipped) == (0, 1)
    assert v.verified_upto() == 0  # its tokens count as unverified


async def test_each_session_is_drawn_once_and_a_short_one_at_its_end() -> None:
    v = verifier(6 + 32)
    a, b, short = hop_session(0, 10), hop_session(10, 20), hop_session(20, 30)
    draws = []
    trust = v.client.trust
    trust.should_check = lambda peer: draws.append(peer) or len(draws) != 2  # type: ignore[method-assign]
    generate(v, a, 6, 37)
    generate(v, b, 6, 37)
    v.record(short, step(0, 6))  # shorter than a window: drawn when the generation ends
    checks = [v.check_of(h) for h in (a, b, short)]
    assert len(draws) == 2 and checks[2] is not None and checks[2].sample is V.Sample.UNDRAWN
    await v.flush(everything=False, timeout=0.01)
    assert len(draws) == 3
    assert [c.sample for c in checks] == [V.Sample.SHADOWED, V.Sample.SKIPPED, V.Sample.SHADOWED]  # type: ignore[union-attr]
    assert [c.due for c in checks] == [37, 0, 6]  # type: ignore[union-attr]


async def test_a_strict_generation_checks_every_session_without_a_draw() -> None:
    v = verifier(6 + 32, sample=False, strict=True)
    hop = hop_session(10, 20)
    check = generate(v, hop, 6, 37)
    assert check.sample is V.Sample.SHADOWED
    await v.flush(everything=True, timeout=0.01)
    assert check.due == 37


async def test_a_generation_that_stops_early_checks_its_deferred_window_at_the_end() -> None:
    v = verifier(6 + 32)
    hop = hop_session(10, 20)
    check = generate(v, hop, 6, 33)  # a stop token after position 32
    assert (check.due, check.deferred) == (16, 32)
    await v.flush(everything=False, timeout=0.01)
    assert check.due == 33


async def test_a_rollback_keeps_only_the_deferred_positions_before_it() -> None:
    v = verifier(6 + 32)
    hop = hop_session(10, 20)
    check = generate(v, hop, 6, 34)
    check.truncate(30)
    assert check.deferred == 30
