"""What verified work costs the fleet (issue 11): a check reaches its verifier host together with
this client's decode steps there, so the host's StepBatcher computes them in one weight pass."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import trio

from idlefleet.node import verifier as V
from idlefleet.node.client import ClientConfig, FleetClient

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
