"""Liveness on trio's virtual clock, against a fake host: heartbeats, RTT, misses, eviction, re-probes."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from idlefleet.p2p.errors import DeadlineExceeded, PeerUnreachable
from idlefleet.p2p.liveness import HEARTBEAT_PROTOCOL, PROBE_PROTOCOL, Liveness, LivenessConfig
from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.wire import PROTOCOL_VERSION, Envelope

ME = "12D3KooWMe"
PEER = "12D3KooWPeer"
OTHER = "12D3KooWOther"
CONFIG = LivenessConfig()  # interval 1 s, timeout 2 s, 2 misses, then 2 indirect probes

Behaviour = Callable[[dict[str, Any]], Awaitable[Envelope]]
RequestHandler = Callable[[str, Envelope], Awaitable[tuple[str, dict[str, Any]]]]


class FakeHost:
    """Just what Liveness uses of ``p2p.host.Host``. Each peer's answer is a swappable behaviour."""

    def __init__(self) -> None:
        self.handlers: dict[str, tuple[str, RequestHandler]] = {}  # protocol -> (request kind, handler)
        self.disconnect_callbacks: list[Callable[[str], None]] = []
        self.connected: set[str] = set()
        self.behaviour: dict[str, Behaviour] = {}
        self.requests: list[tuple[float, str]] = []
        self.evicted: list[tuple[float, str]] = []
        # helper -> how it answers a probe_request (SWIM ping-req); default: it does not serve one
        self.probe_behaviour: dict[str, Behaviour] = {}
        self.probes: list[tuple[float, str, str]] = []  # (time, helper, target)

    # -- the Host surface ------------------------------------------------------------------
    def set_request_handler(self, protocol: str, kind: str, handler: RequestHandler) -> None:
        self.handlers[protocol] = (kind, handler)

    def handler(self, protocol: str = HEARTBEAT_PROTOCOL) -> RequestHandler:
        return self.handlers[protocol][1]

    def on_disconnect(self, callback: Callable[[str], None]) -> None:
        self.disconnect_callbacks.append(callback)

    def connected_peers(self) -> set[str]:
        return set(self.connected)

    async def request(self, peer_id: str, protocol: str, kind: str, body: dict[str, Any], *,
                      timeout: float, reuse: bool = False) -> Envelope:
        if protocol == PROBE_PROTOCOL:
            assert kind == "probe_request"
            self.probes.append((trio.current_time(), peer_id, body["target"]))
            behaviour = self.probe_behaviour.get(peer_id, unreachable)
            try:
                with trio.fail_after(timeout):
                    return await behaviour(body)
            except trio.TooSlowError:
                raise DeadlineExceeded(f"probe through {peer_id} took over {timeout}s") from None
        assert protocol == HEARTBEAT_PROTOCOL
        assert kind == "heartbeat"
        self.requests.append((trio.current_time(), peer_id))
        try:
            with trio.fail_after(timeout):
                reply = await self.behaviour[peer_id](body)
        except trio.TooSlowError:
            raise DeadlineExceeded(f"heartbeat to {peer_id} took over {timeout}s") from None
        self.connected.add(peer_id)  # like the real host, a request (re)connects
        return reply

    def evict(self, peer_id: str) -> None:
        self.evicted.append((trio.current_time(), peer_id))
        self.disconnect(peer_id)  # the real host closes the socket; libp2p then reports it

    # -- test controls ---------------------------------------------------------------------
    def disconnect(self, peer_id: str) -> None:
        if peer_id in self.connected:
            self.connected.discard(peer_id)
            for callback in self.disconnect_callbacks:
                callback(peer_id)


# --- peer behaviours ----------------------------------------------------------------------------


def answering(delay: float = 0.05) -> Behaviour:
    """A healthy peer running our own heartbeat handler, ``delay`` seconds away."""
    peer_host = FakeHost()
    Liveness(peer_host, lambda peer, reason: None)  # type: ignore[arg-type]
    handler = peer_host.handler()

    async def behave(body: dict[str, Any]) -> Envelope:
        await trio.sleep(delay)
        kind, reply = await handler(ME, Envelope(PROTOCOL_VERSION, "heartbeat", body))
        return Envelope(PROTOCOL_VERSION, kind, reply)

    return behave


async def frozen(body: dict[str, Any]) -> Envelope:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def unreachable(body: dict[str, Any]) -> Envelope:
    raise PeerUnreachable("connection refused")


async def wrong_nonce(body: dict[str, Any]) -> Envelope:
    return Envelope(PROTOCOL_VERSION, "heartbeat_ack", {"nonce": body["nonce"] ^ 1})


async def wrong_kind(body: dict[str, Any]) -> Envelope:
    return Envelope(PROTOCOL_VERSION, "error", {"nonce": body["nonce"]})


def scripted(*outcomes: Behaviour) -> Behaviour:
    """Answer the n-th heartbeat with ``outcomes[n]``, then like the last one forever."""
    calls = 0

    async def behave(body: dict[str, Any]) -> Envelope:
        nonlocal calls
        outcome = outcomes[min(calls, len(outcomes) - 1)]
        calls += 1
        return await outcome(body)

    return behave


# --- harness ------------------------------------------------------------------------------------


class Deaths:
    def __init__(self) -> None:
        self.calls: list[tuple[float, str, str]] = []

    def __call__(self, peer_id: str, reason: str) -> None:
        self.calls.append((trio.current_time(), peer_id, reason))

    def peers(self) -> list[str]:
        return [peer for _, peer, _ in self.calls]


@asynccontextmanager
async def running(host: FakeHost, config: LivenessConfig = CONFIG) -> AsyncIterator[tuple[Liveness, Deaths]]:
    deaths = Deaths()
    liveness = Liveness(host, deaths, config)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(liveness.run)
        yield liveness, deaths
        nursery.cancel_scope.cancel()


def host_with(**peers: Behaviour) -> FakeHost:
    host = FakeHost()
    names = {"peer": PEER, "other": OTHER}
    for name, behaviour in peers.items():
        host.connected.add(names[name])
        host.behaviour[names[name]] = behaviour
    return host


# --- heartbeats to a healthy peer -----------------------------------------------------------------


async def test_responsive_peer_is_never_evicted_and_gets_an_rtt(autojump_clock: trio.abc.Clock) -> None:
    host = host_with(peer=answering(0.05))
    start = trio.current_time()
    async with running(host) as (liveness, deaths):
        await trio.sleep(60.0)
    assert deaths.calls == []
    assert host.evicted == []
    assert liveness.dead_reported == 0
    assert liveness.rtt_s[PEER] == pytest.approx(0.05)
    # One heartbeat per interval, starting at once.
    times = [t - start for t, _ in host.requests]
    assert times[0] == pytest.approx(0.0)
    assert len(times) == pytest.approx(60.0 / CONFIG.interval_s, abs=1)
    assert all(b - a == pytest.approx(CONFIG.interval_s) for a, b in itertools.pairwise(times))


async def test_rtt_is_an_ewma(autojump_clock: trio.abc.Clock) -> None:
    host = host_with(peer=scripted(answering(0.1), answering(0.2)))
    async with running(host) as (liveness, _):
        await trio.sleep(1.0)
        assert liveness.rtt_s[PEER] == pytest.approx(0.1)
        await trio.sleep(CONFIG.interval_s)
        assert liveness.rtt_s[PEER] == pytest.approx(0.7 * 0.1 + 0.3 * 0.2)


async def test_no_peers_no_requests(autojump_clock: trio.abc.Clock) -> None:
    host = FakeHost()
    async with running(host) as (_, deaths):
        await trio.sleep(30.0)
    assert host.requests == []
    assert deaths.calls == []


# --- frozen peers and misses ----------------------------------------------------------------------


async def test_frozen_peer_is_evicted_after_misses_and_reported_once(autojump_clock: trio.abc.Clock) -> None:
    host = host_with(peer=frozen, other=answering())
    start = trio.current_time()
    async with running(host) as (liveness, deaths):
        await trio.sleep(120.0)

    assert deaths.peers() == [PEER]
    dead_at = deaths.calls[0][0] - start
    misses, interval, timeout = CONFIG.misses, CONFIG.interval_s, CONFIG.timeout_s
    assert misses * timeout <= dead_at <= interval * misses + timeout * misses
    assert f"{misses} missed heartbeat(s)" in deaths.calls[0][2]
    assert [peer for _, peer in host.evicted] == [PEER]
    assert host.evicted[0][0] == deaths.calls[0][0]
    assert liveness.dead_reported == 1
    assert PEER not in liveness.rtt_s
    # Exactly `misses` heartbeats were spent on it; none after the eviction.
    assert [t for t, p in host.requests if p == PEER and t - start > dead_at] == []
    assert len([p for _, p in host.requests if p == PEER]) == misses
    assert OTHER in liveness.rtt_s


async def test_eviction_time_follows_the_config(autojump_clock: trio.abc.Clock) -> None:
    config = LivenessConfig(interval_s=1.0, timeout_s=0.5, misses=2)
    host = host_with(peer=frozen)
    start = trio.current_time()
    async with running(host, config) as (_, deaths):
        await trio.sleep(30.0)
    assert deaths.peers() == [PEER]
    assert 2 * 0.5 <= deaths.calls[0][0] - start <= 2 * 1.0 + 2 * 0.5


async def test_misses_must_be_consecutive(autojump_clock: trio.abc.Clock) -> None:
    ok = answering()
    almost = [frozen] * (CONFIG.misses - 1)
    host = host_with(peer=scripted(*almost, ok, *almost, ok, *almost, ok))
    async with running(host) as (liveness, deaths):
        await trio.sleep(60.0)
    assert deaths.calls == []
    assert host.evicted == []
    assert PEER in liveness.rtt_s


async def test_unreachable_connected_peer_is_evicted_after_misses(autojump_clock: trio.abc.Clock) -> None:
    host = host_with(peer=unreachable)
    start = trio.current_time()
    async with running(host) as (_, deaths):
        await trio.sleep(60.0)
    assert deaths.peers() == [PEER]
    # Failures are immediate, so it takes exactly `misses` heartbeat intervals.
    assert deaths.calls[0][0] - start == pytest.approx((CONFIG.misses - 1) * CONFIG.interval_s)


@pytest.mark.parametrize("bad_reply", [wrong_nonce, wrong_kind])
async def test_bad_reply_counts_as_a_miss(autojump_clock: trio.abc.Clock, bad_reply: Behaviour) -> None:
    host = host_with(peer=bad_reply)
    async with running(host) as (liveness, deaths):
        await trio.sleep(60.0)
    assert deaths.peers() == [PEER]
    assert "missed heartbeat" in deaths.calls[0][2]
    assert len(host.requests) == CONFIG.misses
    assert PEER not in liveness.rtt_s


async def test_one_bad_reply_then_good_ones_is_not_dead(autojump_clock: trio.abc.Clock) -> None:
    host = host_with(peer=scripted(*[wrong_nonce] * (CONFIG.misses - 1), answering()))
    async with running(host) as (_, deaths):
        await trio.sleep(60.0)
    assert deaths.calls == []


async def test_evicted_peer_that_comes_back_is_watched_again(autojump_clock: trio.abc.Clock) -> None:
    host = host_with(peer=frozen)
    async with running(host) as (liveness, deaths):
        await trio.sleep(30.0)
        assert deaths.peers() == [PEER]
        # It reconnects and answers, then freezes again much later.
        host.behaviour[PEER] = answering()
        host.connected.add(PEER)
        await trio.sleep(30.0)
        assert deaths.peers() == [PEER]
        assert PEER in liveness.rtt_s
        host.behaviour[PEER] = frozen
        await trio.sleep(30.0)
    assert deaths.peers() == [PEER, PEER]


# --- disconnects --------------------------------------------------------------------------------


async def test_disconnected_peer_whose_reprobe_fails_is_dead_at_once(autojump_clock: trio.abc.Clock) -> None:
    host = host_with(peer=answering(), other=answering())
    async with running(host) as (_, deaths):
        await trio.sleep(5.5)  # between heartbeats: none in flight
        host.behaviour[PEER] = unreachable  # SIGKILLed: the re-dial is refused
        killed_at = trio.current_time()
        host.disconnect(PEER)
        await trio.sleep(0.001)
        assert deaths.peers() == [PEER]
        assert deaths.calls[0][0] == killed_at
        assert "disconnected" in deaths.calls[0][2]
        await trio.sleep(60.0)
    assert deaths.peers() == [PEER]  # our own eviction's disconnect is not reported again
    assert [peer for _, peer in host.evicted] == [PEER]


async def test_disconnected_peer_that_answers_the_reprobe_is_alive(autojump_clock: trio.abc.Clock) -> None:
    host = host_with(peer=answering())
    async with running(host) as (liveness, deaths):
        await trio.sleep(5.5)
        host.disconnect(PEER)  # a flaky link: the re-probe reconnects
        reprobe_at = trio.current_time()
        await trio.sleep(1.0)
        assert any(t == reprobe_at and p == PEER for t, p in host.requests)
        await trio.sleep(60.0)
    assert deaths.calls == []
    assert host.evicted == []
    assert PEER in liveness.rtt_s
    assert PEER in host.connected


async def test_disconnect_during_an_inflight_heartbeat_is_not_lost(autojump_clock: trio.abc.Clock) -> None:
    # SIGKILL while a heartbeat is on the wire: the connection closes (disconnect callback) and the
    # pending request fails. The peer is no longer connected, so no periodic heartbeat will ever
    # probe it again: the disconnect must still lead to a re-probe and a prompt death.
    host = host_with(peer=answering())
    gone = trio.Event()

    async def killed_mid_request(body: dict[str, Any]) -> Envelope:
        await gone.wait()
        raise PeerUnreachable("stream reset")

    async with running(host) as (_, deaths):
        await trio.sleep(5.5)
        host.behaviour[PEER] = killed_mid_request
        await trio.sleep(1.0)  # the heartbeat sent at t=6 is now in flight
        assert host.requests[-1][0] == pytest.approx(trio.current_time() - 0.5)
        host.behaviour[PEER] = scripted(killed_mid_request, unreachable)
        host.disconnect(PEER)
        gone.set()
        await trio.sleep(CONFIG.timeout_s)
        assert deaths.peers() == [PEER]
        await trio.sleep(60.0)
    assert deaths.peers() == [PEER]


async def test_disconnect_of_an_unknown_peer_before_run_is_ignored(autojump_clock: trio.abc.Clock) -> None:
    host = FakeHost()
    deaths = Deaths()
    Liveness(host, deaths)  # type: ignore[arg-type]
    host.connected.add(PEER)
    host.disconnect(PEER)  # not running yet: nothing to start the re-probe in, and no crash
    assert deaths.calls == []
    assert host.requests == []


# --- the heartbeat handler ----------------------------------------------------------------------


async def test_handler_echoes_the_nonce() -> None:
    host = FakeHost()
    Liveness(host, Deaths())  # type: ignore[arg-type]
    handler = host.handler()
    for nonce in (0, 1, 2**63 - 1):
        kind, body = await handler(PEER, Envelope(PROTOCOL_VERSION, "heartbeat", {"nonce": nonce}))
        assert (kind, body) == ("heartbeat_ack", {"nonce": nonce})


@pytest.mark.parametrize("body", [{}, {"nonce": None}, {"nonce": "7"}, {"nonce": 7.0}, {"nonce": True},
                                  {"nonce": [7]}, {"once": 7}])
async def test_handler_rejects_a_missing_or_non_integer_nonce(body: dict[str, Any]) -> None:
    host = FakeHost()
    Liveness(host, Deaths())  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError, match="nonce"):
        await host.handler()(PEER, Envelope(PROTOCOL_VERSION, "heartbeat", body))


def test_liveness_registers_its_handler_and_disconnect_callback() -> None:
    host = FakeHost()
    Liveness(host, Deaths())  # type: ignore[arg-type]
    assert sorted(host.handlers) == [HEARTBEAT_PROTOCOL, PROBE_PROTOCOL]
    assert host.handlers[HEARTBEAT_PROTOCOL][0] == "heartbeat"
    assert host.handlers[PROBE_PROTOCOL][0] == "probe_request"
    assert len(host.disconnect_callbacks) == 1


# --- SWIM: indirect probes, checks, frozen-peer detection time (issue 8) ----------------------------


def probe_answer(alive: bool, delay: float = 0.05) -> Behaviour:
    """A helper that answers a probe_request with ``alive`` after ``delay``."""

    async def behave(body: dict[str, Any]) -> Envelope:
        await trio.sleep(delay)
        return Envelope(PROTOCOL_VERSION, "probe_result", {"nonce": body["nonce"], "alive": alive})

    return behave


async def test_frozen_peer_leaves_within_seven_seconds(autojump_clock: trio.abc.Clock) -> None:
    # Issue 8: detection took 14.7 s. Now at most interval + misses * timeout + indirect timeout.
    host = host_with(peer=answering(), other=answering())
    host.probe_behaviour[OTHER] = frozen  # the helper cannot reach it either (no answer in time)
    async with running(host) as (liveness, deaths):
        await trio.sleep(10.3)
        host.behaviour[PEER] = frozen
        frozen_at = trio.current_time()
        await trio.sleep(30.0)
    assert deaths.peers() == [PEER]
    took = deaths.calls[0][0] - frozen_at
    bound = CONFIG.interval_s + CONFIG.misses * CONFIG.timeout_s + CONFIG.indirect_timeout_s
    assert CONFIG.misses * CONFIG.timeout_s <= took <= bound <= 7.0
    assert [h for _, h, t in host.probes if t == PEER] == [OTHER]
    assert "indirect" in deaths.calls[0][2]
    assert liveness.indirect_saves == 0


async def test_suspect_that_answers_an_indirect_probe_is_not_evicted(autojump_clock: trio.abc.Clock) -> None:
    # Our link to it is bad (or we are slow), but another peer still reaches it: no false eviction.
    host = host_with(peer=frozen, other=answering())
    host.probe_behaviour[OTHER] = probe_answer(alive=True)
    async with running(host) as (liveness, deaths):
        await trio.sleep(30.0)
    assert deaths.calls == []
    assert host.evicted == []
    assert liveness.indirect_saves >= 1


async def test_indirect_probes_ask_at_most_k_helpers_that_answered_us(autojump_clock: trio.abc.Clock) -> None:
    host = host_with(peer=answering())
    helpers = [f"12D3KooWHelper{i}" for i in range(5)]
    for h in helpers:
        host.connected.add(h)
        host.behaviour[h] = answering()
        host.probe_behaviour[h] = probe_answer(alive=False)
    silent = "12D3KooWSilent"  # connected but never answered us: not asked to vouch
    host.connected.add(silent)
    host.behaviour[silent] = frozen
    async with running(host) as (_, deaths):
        await trio.sleep(3.5)
        host.behaviour[PEER] = frozen
        await trio.sleep(20.0)
    assert PEER in deaths.peers()
    asked = [h for _, h, t in host.probes if t == PEER]
    assert len(asked) == CONFIG.indirect
    assert set(asked) <= set(helpers)


async def test_misses_while_this_process_was_stalled_do_not_count(autojump_clock: trio.abc.Clock) -> None:
    # A busy event loop (GIL-bound compute, swapping) delays our own timers: the heartbeat deadline
    # then says nothing about the peer. Simulated by jumping the clock under the running loop.
    host = host_with(peer=answering(1.0))
    async with running(host) as (_, deaths):
        await trio.sleep(2.2)
        for _ in range(5):
            autojump_clock.jump(3.0)  # type: ignore[attr-defined]
            await trio.sleep(0.5)
        await trio.sleep(10.0)
    assert deaths.calls == []


async def test_check_of_a_live_peer_and_of_a_frozen_one(autojump_clock: trio.abc.Clock) -> None:
    host = host_with(peer=answering(), other=answering())
    host.probe_behaviour[OTHER] = probe_answer(alive=False)
    async with running(host) as (liveness, deaths):
        await trio.sleep(1.5)
        assert await liveness.check(PEER) is True
        host.behaviour[PEER] = frozen
        start = trio.current_time()
        assert await liveness.check(PEER) is False
        assert trio.current_time() - start <= max(CONFIG.timeout_s, CONFIG.indirect_timeout_s)
        assert deaths.peers() == [PEER]  # a connected peer failing a check is evicted and reported


async def test_check_through_helpers_only_when_not_connected(autojump_clock: trio.abc.Clock) -> None:
    host = host_with(other=answering())
    stranger = "12D3KooWStranger"
    async with running(host) as (liveness, deaths):
        await trio.sleep(1.5)
        host.probe_behaviour[OTHER] = probe_answer(alive=True)
        assert await liveness.check(stranger) is True
        host.probe_behaviour[OTHER] = probe_answer(alive=False)
        assert await liveness.check(stranger) is False
        # The accuser is never asked to confirm its own accusation: nobody left to ask.
        assert await liveness.check(stranger, exclude={OTHER}) is None
    assert deaths.calls == []  # not connected: nothing to evict here
    assert host.requests.count((0.0, stranger)) == 0


async def test_probe_handler_heartbeats_connected_targets_only(autojump_clock: trio.abc.Clock) -> None:
    host = host_with(peer=answering(), other=frozen)
    liveness = Liveness(host, Deaths())  # type: ignore[arg-type]
    handler = host.handler(PROBE_PROTOCOL)

    async def ask(target: str, asker: str = "12D3KooWAsker") -> dict[str, Any]:
        kind, body = await handler(asker, Envelope(PROTOCOL_VERSION, "probe_request",
                                                   {"nonce": 7, "target": target}))
        assert kind == "probe_result"
        return body

    assert await ask(PEER) == {"nonce": 7, "alive": True}
    assert await ask(OTHER) == {"nonce": 7, "alive": False}  # timed out within our deadline
    assert await ask("12D3KooWNotConnected") == {"nonce": 7, "alive": False}  # we dial nobody
    assert await ask(PEER, asker=PEER) == {"nonce": 7, "alive": False}  # no self-vouching
    assert liveness.rtt_s[PEER] > 0


@pytest.mark.parametrize("body", [{}, {"nonce": 1}, {"nonce": 1, "target": 5}, {"nonce": -1, "target": PEER},
                                  {"nonce": 1, "target": ""}, {"nonce": 1, "target": "x" * 129},
                                  {"nonce": 1, "target": PEER, "extra": 1}])
async def test_probe_handler_rejects_malformed_requests(body: dict[str, Any]) -> None:
    host = FakeHost()
    Liveness(host, Deaths())  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError):
        await host.handler(PROBE_PROTOCOL)(PEER, Envelope(PROTOCOL_VERSION, "probe_request", body))


async def test_a_slow_peer_that_heartbeats_us_is_not_evicted(autojump_clock: trio.abc.Clock) -> None:
    # An overloaded peer answers our heartbeats late, but its own heartbeats still reach us: it is
    # slow, not frozen (a frozen process sends nothing). No eviction, however late its answers.
    host = host_with(peer=frozen)
    async with running(host) as (liveness, deaths):
        for _ in range(30):
            await host.handler()(PEER, Envelope(PROTOCOL_VERSION, "heartbeat", {"nonce": 1}))
            await trio.sleep(1.0)
        assert deaths.calls == []
        assert liveness.slow_saves >= 1
        assert await liveness.check(PEER) is True
        # It stops heartbeating us too (frozen now): gone within the usual bound.
        stopped = trio.current_time()
        await trio.sleep(20.0)
    assert deaths.peers() == [PEER]
    took = deaths.calls[0][0] - stopped
    assert took <= CONFIG.interval_s + (CONFIG.misses + 1) * CONFIG.timeout_s, took
