"""What verified work costs the fleet (issue 11): a check reaches its verifier host together with
this client's decode steps there, so the host's StepBatcher computes them in one weight pass; a
verifier session a finished generation leaves open serves the client's next generation."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import trio

from idlefleet.node import verifier as V
from idlefleet.node.client import ClientConfig, FleetClient, _HopSession

HOST = "12D3KooWverifierhost"


class StubClient:
    """The parts of a FleetClient that Verifier._align uses (the real methods)."""

    config = ClientConfig()
    note_step = FleetClient.note_step
    wait_step_to = FleetClient.wait_step_to

    def __init__(self) -> None:
        self.open_sessions: Counter[str] = Counter()
        self._stepping: dict[str, trio.Event] = {}


def verifier() -> tuple[V.Verifier, StubClient]:
    client = StubClient()
    return V.Verifier(SimpleNamespace(client=client)), client  # type: ignore[arg-type]


async def test_a_check_waits_for_the_next_step_to_its_host(autojump_clock: trio.abc.Clock) -> None:
    v, client = verifier()
    client.open_sessions[HOST] = 1  # another generation of ours has a hop there
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(v._align, HOST)
        await trio.sleep(0.1)
        client.note_step("12D3KooWsomeoneelse")  # a step elsewhere does not release it
        await trio.sleep(0.05)
        client.note_step(HOST)
    assert abs(trio.current_time() - t0 - 0.15) < 1e-6
    assert client._stepping == {}  # nothing kept once released


async def test_a_check_waits_at_most_align_s(autojump_clock: trio.abc.Clock) -> None:
    v, client = verifier()
    client.open_sessions[HOST] = 2
    t0 = trio.current_time()
    await v._align(HOST)
    assert abs(trio.current_time() - t0 - V.ALIGN_S) < 1e-6


async def test_a_check_goes_at_once_with_no_hop_of_ours_there_or_at_the_end(
        autojump_clock: trio.abc.Clock) -> None:
    v, client = verifier()
    t0 = trio.current_time()
    await v._align(HOST)  # no decode step of ours goes there: nothing to wait for
    client.open_sessions[HOST] = 1
    await v.flush(everything=False, timeout=1.0)  # the generation ends (no checks are due)
    await v._align(HOST)
    assert trio.current_time() == t0


class ClosingPipeline:
    """Records the sessions a parked session's pipeline closes."""

    def __init__(self) -> None:
        self.closed: list[Any] = []

    async def _close(self, session: Any) -> None:
        self.closed.append(session)


def session(peer: str = HOST, start: int = 10, end: int = 20, max_length: int = 64) -> _HopSession:
    s = _HopSession(peer, start, end, max_length=max_length)
    s.stream = object()  # type: ignore[assignment]  # open (never used here)
    return s


async def test_a_parked_verifier_session_serves_the_next_generation(autojump_clock: trio.abc.Clock) -> None:
    pool, pipeline = V.VerifierSessions(), ClosingPipeline()
    s = session()
    async with trio.open_nursery() as nursery:
        assert pool.park(pipeline, s, nursery)  # type: ignore[arg-type]
        assert pool.take(0, 10, 64, lambda peer: True) is None  # other blocks
        assert pool.take(10, 20, 65, lambda peer: True) is None  # longer than it was opened for
        assert pool.take(10, 20, 64, lambda peer: peer != HOST) is None  # not usable (e.g. banned)
        await trio.sleep(V.PARK_S / 2)
        assert pool.take(10, 20, 48, lambda peer: True) is s
        assert pool.take(10, 20, 48, lambda peer: True) is None and len(pool) == 0
    assert pool.reused == 1 and pipeline.closed == []  # taken: its expiry does not close it


async def test_a_parked_session_is_closed_when_unused_or_when_the_node_stops(
        autojump_clock: trio.abc.Clock) -> None:
    pool, pipeline = V.VerifierSessions(), ClosingPipeline()
    idle, kept = session(), session(start=0, end=10)
    async with trio.open_nursery() as nursery:
        pool.park(pipeline, idle, nursery)  # type: ignore[arg-type]
        await trio.sleep(V.PARK_S + 0.1)
        assert pipeline.closed == [idle] and len(pool) == 0  # its receipt is exchanged on close
        pool.park(pipeline, kept, nursery)  # type: ignore[arg-type]
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()  # the node stops
    assert pipeline.closed == [idle, kept] and len(pool) == 0
