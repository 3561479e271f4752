"""The fleet client against real stage servers over real libp2p, one of them hostile (issue 8,
finding 6): a bad reply is that peer's fault (fail over); a local error is nobody's; and the
``local_blocks`` privacy option (finding 8)."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.client.config import ClientConfig, ClientModel, GenerationFailed
from idlefleet.node.client.fleet import FleetClient, own_sessions_load
from idlefleet.node.config import NodeConfig
from idlefleet.node.model.generate import generate, local_middle
from idlefleet.node.model.sampling import SamplingParams
from idlefleet.node.model.stage import Stage
from idlefleet.node.serve.server import StageServer
from idlefleet.p2p.errors import NetworkError
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.protocols import session as S
from idlefleet.protocols.errors import ConfigError, LocalProtocolError
from idlefleet.protocols.routing import Candidate, Hop, NoRoute, find_route
from idlefleet.protocols.tensors import EncodedTensor, encode_hidden

PROMPT = "My bank PIN is 4921"
NEW = 4


def int8_huge_scale(x: np.ndarray, _dtype: str) -> EncodedTensor:
    """The attack from issue 8: int8 with a scale of 3e38 (dequantizes to inf)."""
    q = np.full(x.shape, 127, np.int8)
    return EncodedTensor("int8", x.shape, q.tobytes(), np.full(x.shape[0], 3e38, "<f4").tobytes())


def huge_but_finite(x: np.ndarray, dtype: str) -> EncodedTensor:
    """Values of 1e30 in the session's own dtype: finite, but the next RMSNorm overflows."""
    return encode_hidden(np.full(x.shape, 1e30 if dtype != "float16" else 6e4, np.float32), dtype)


def hostile_handler(reply: Callable[[np.ndarray, str], EncodedTensor], opened: list[str]) -> Any:
    """A peer that opens sessions properly and answers every step with ``reply``."""
    async def handle(fs: FramedStream) -> None:
        dtype = "float32"
        try:
            while True:
                env = await fs.receive(timeout=10)
                if env.kind == "session_open":
                    req = S.OpenRequest.from_body(env.body)
                    dtype = req.dtype
                    opened.append(dtype)
                    await fs.send("session_opened", {"session": 1, "start": req.start, "end": req.end},
                                  timeout=5)
                elif env.kind == "step":
                    shape = tuple(env.body["hidden"]["shape"])
                    result = S.StepResult(env.body["position"], reply(np.zeros(shape, np.float32), dtype))
                    await fs.send("step_result", result.to_body(), timeout=5)
                else:
                    return
        except NetworkError:
            pass
    return handle


def candidate(peer_id: str, start: int, *, best: bool) -> Candidate:
    # The hostile peer claims to be the best: tiny RTT, huge compute, idle.
    return Candidate(peer_id, start, 30, 0.0001 if best else 0.01, 1e6 if best else 100.0,
                     0.0 if best else 0.5, 1.0, True, "online", None, False, "u33d")


class DirectClient(FleetClient):
    """A FleetClient whose candidates are given (instead of gossiped); everything it does on the
    network is real."""

    def __init__(self, host: Host, model: ClientModel, config: ClientConfig,
                 peers: dict[str, tuple[str, bool]]) -> None:
        node = SimpleNamespace(host=host, config=NodeConfig(), peer_id=host.peer_id,
                               liveness=SimpleNamespace(min_rtt_s={}))
        # One honest host: there is no independent host to verify against (the verifier has its
        # own tests, tests/test_verified_work.py); signatures are still checked.
        config = dataclasses.replace(config, verify=False)
        super().__init__(node, model, config)  # type: ignore[arg-type]
        self.peers = peers  # peer id -> (multiaddr, claims to be best)

    def candidates(self) -> list[Candidate]:
        return [candidate(p, self.model.local_blocks, best=best) for p, (_a, best) in self.peers.items()]

    async def ensure_connected(self, peer_id: str) -> None:
        if peer_id not in self.node.host.connected_peers():
            await self.node.host.connect(self.peers[peer_id][0])


@asynccontextmanager
async def fleet(whole_model: Stage, hostile: Any | None, *, honest: bool = True,
                hostile_key: Ed25519PrivateKey | None = None,
                ) -> AsyncIterator[tuple[Host, dict[str, tuple[str, bool]], list[Any]]]:
    """An honest StageServer (every block) and/or a hostile peer (with ``hostile_key``, if given),
    each on its own libp2p host."""
    events: list[Any] = []
    async with AsyncExitStack() as stack:
        peers: dict[str, tuple[str, bool]] = {}
        if honest:
            key = Ed25519PrivateKey.generate()  # the server signs its step results with its host's key
            server = StageServer(whole_model, on_event=lambda event, **f: events.append((event, f)), key=key)
            host = await stack.enter_async_context(open_host(key, HostConfig()))
            host.set_stream_handler(S.STAGE_PROTOCOL, server.handle)
            peers[host.peer_id] = (host.multiaddrs()[0], False)
        if hostile is not None:
            bad = await stack.enter_async_context(open_host(hostile_key or Ed25519PrivateKey.generate(),
                                                            HostConfig()))
            bad.set_stream_handler(S.STAGE_PROTOCOL, hostile)
            peers[bad.peer_id] = (bad.multiaddrs()[0], True)
        me = await stack.enter_async_context(open_host(Ed25519PrivateKey.generate(), HostConfig()))
        yield me, peers, events


@pytest.fixture(scope="module")
def reference(whole_model: Stage, client_model: ClientModel) -> Callable[[str], list[int]]:
    """Greedy ids of PROMPT through ``whole_model`` in this process, for a wire dtype."""
    cache: dict[str, list[int]] = {}

    def run(dtype: str) -> list[int]:
        if dtype not in cache:
            ids = client_model.tokenizer.encode(PROMPT)
            if dtype == "float32":
                middle = local_middle(whole_model, whole_model.new_cache())
            else:  # what the fleet computes: the wire rounds the input and the output of the hop
                c = whole_model.new_cache()

                def middle(h: np.ndarray, pos: int) -> np.ndarray:
                    from idlefleet.protocols.tensors import TensorLimits, decode_hidden
                    rt = lambda a: decode_hidden(encode_hidden(a, dtype), TensorLimits())  # noqa: E731
                    return rt(whole_model.forward(rt(h), c, pos))
            cache[dtype] = generate(client_model.head, middle, ids, SamplingParams(max_new_tokens=NEW),
                                    client_model.tokenizer.stop_ids).new_ids
        return cache[dtype]

    return run


@pytest.mark.parametrize(("reply", "dtype"), [
    (int8_huge_scale, "float32"),  # another dtype than the session's
    (int8_huge_scale, "int8"),  # the session's dtype, values that overflow to inf
    (huge_but_finite, "float32"),  # finite, but far beyond any real hidden state
])
async def test_a_bad_reply_fails_over_to_an_honest_peer(
        whole_model: Stage, client_model: ClientModel, reference: Callable[[str], list[int]],
        reply: Callable[[np.ndarray, str], EncodedTensor], dtype: str) -> None:
    opened: list[str] = []
    async with fleet(whole_model, hostile_handler(reply, opened)) as (me, peers, _events):
        client = DirectClient(me, client_model, ClientConfig(wire_dtype=dtype), peers)
        result = await client.generate(PROMPT, max_new_tokens=NEW)
    assert opened == [dtype]  # the hostile peer was tried first ...
    assert result.failovers == 1  # ... its reply refused, the span re-routed ...
    honest = next(p for p, (_a, best) in peers.items() if not best)
    assert [h["peer_id"] for h in result.route] == [honest]
    assert result.new_ids == reference(dtype)  # ... and the tokens are right
    assert len(client.banned()) == 1


async def test_a_generation_only_bad_peers_can_serve_fails_clearly(
        whole_model: Stage, client_model: ClientModel) -> None:
    opened: list[str] = []
    async with fleet(whole_model, hostile_handler(int8_huge_scale, opened), honest=False) as (me, peers, _):
        client = DirectClient(me, client_model, ClientConfig(wire_dtype="int8"), peers)
        with pytest.raises(GenerationFailed, match="no route"):
            await client.generate(PROMPT, max_new_tokens=NEW)  # never token 0 and empty text
    assert opened == ["int8"]


async def test_local_errors_are_raised_before_any_peer_is_contacted(
        whole_model: Stage, client_model: ClientModel) -> None:
    with pytest.raises(ConfigError, match="wire_dtype"):
        ClientConfig(wire_dtype="bf16")
    with pytest.raises(ConfigError, match="local_blocks"):
        ClientConfig(local_blocks=-1)
    with pytest.raises(ConfigError, match="local blocks"):
        FleetClient(SimpleNamespace(), client_model, ClientConfig(local_blocks=2))  # type: ignore[arg-type]
    opened: list[str] = []
    async with fleet(whole_model, hostile_handler(int8_huge_scale, opened), honest=False) as (me, peers, _):
        client = DirectClient(me, client_model, ClientConfig(), peers)
        context = client_model.head.config.context_length
        with pytest.raises(LocalProtocolError, match="context"):
            await client.generate(PROMPT, max_new_tokens=context)
        assert opened == []  # nobody was asked ...
        assert client.banned() == frozenset()  # ... and nobody is blamed
        assert not me.connected_peers()  # not even connected


@pytest.fixture(scope="module")
def client_model_2(model_path: Any) -> ClientModel:
    return ClientModel.load(model_path, local_blocks=2)


async def test_local_blocks_run_here_and_the_route_covers_the_rest(
        whole_model: Stage, client_model_2: ClientModel, reference: Callable[[str], list[int]]) -> None:
    async with fleet(whole_model, None) as (me, peers, events):
        client = DirectClient(me, client_model_2, ClientConfig(local_blocks=2), peers)
        result = await client.generate(PROMPT, max_new_tokens=NEW)
    assert [h["blocks"] for h in result.route] == [[2, 30]]
    assert [f["blocks"] for event, f in events if event == "session_opened"] == [[2, 30]]
    assert result.new_ids == reference("float32")  # the same tokens as the whole model here


def test_concurrent_generations_spread_evenly_over_equal_hosts() -> None:
    """Routing 8 generations one after another, each seeing the sessions the earlier ones hold
    (as FleetClient.candidates does), gives every one of two equal hosts per range 4 of them."""
    loads = [own_sessions_load(n) for n in range(10)]
    assert loads[0] == 0 and all(a < b < 0.9 for a, b in itertools.pairwise(loads))
    hosts = [(f"{r}{k}", start, start + 10)
             for r, start in zip("abc", (0, 10, 20), strict=True) for k in (1, 2)]
    mine: dict[str, int] = dict.fromkeys([h[0] for h in hosts], 0)
    for _ in range(8):
        cands = [Candidate(peer_id=p, start=a, end=b, rtt_s=0.002, compute_gflops=50.0,
                           load=own_sessions_load(mine[p]), battery_soc=0.8, plugged_in=True,
                           state="online", expected_departure=None, link_metered=False, region="u33d")
                 for p, a, b in hosts]
        for hop in find_route(cands, 0, 30, now=1.7e9, my_region="u33d"):
            mine[hop.peer_id] += 1
    assert sorted(mine.values()) == [4] * 6, mine


def test_new_generations_follow_the_routes_of_running_ones_even_while_those_open(
        client_model: ClientModel) -> None:
    """8 generations start at once: each routes while the earlier ones are still opening their
    sessions, and step-time measurements make b1 or b2 the faster in turn (by 10%). The route
    being opened is followed like an open one: 2 chains, not crossing ones."""
    node = SimpleNamespace(host=None, config=NodeConfig(region="u33d"), peer_id="me",
                           liveness=SimpleNamespace(min_rtt_s={}))
    client = FleetClient(node, client_model, ClientConfig(verify=False))  # type: ignore[arg-type]
    measured = {"fast": "b2"}  # the b host measured faster when the next generation routes

    def candidates() -> list[Candidate]:
        return [dataclasses.replace(
            candidate(p, start, best=False), end=start + 10, load=0.0,
            block_s=0.0009 if p == measured["fast"] else 0.001,
            own_load=own_sessions_load(client.statistics().open_sessions[p]))
            for p, start in (("a1", 0), ("a2", 0), ("b1", 10), ("b2", 10), ("c1", 20), ("c2", 20))]

    class Opening:  # a generation between routing and its sessions being open
        def __init__(self, route: list[Hop]) -> None:
            self.routing, self.hops = route, []

    client.candidates = candidates  # type: ignore[method-assign]
    for fast in ["b2", "b1", "b1", "b2", "b1", "b2", "b2", "b1"]:
        measured["fast"] = fast
        route = client.find_route()
        for hop in route:
            client.counters.hold(hop.peer_id)
        client.track(Opening(route))  # type: ignore[arg-type]
    chains = Counter(tuple(h.peer_id for h in p.routing) for p in client.pipelines)  # type: ignore[attr-defined]
    assert len(chains) == 2 and sum(chains.values()) == 8, chains


def test_blocks_of_a_host_routing_excludes_count_as_uncovered(client_model: ClientModel) -> None:
    """A host whose record (fetched through the DHT, say) still says ``joining`` is excluded by
    routing, so its blocks stay uncovered, and wait_ready keeps looking them up until a newer
    record says ``online`` (test_discovery waited out route_wait_s on such a record)."""
    node = SimpleNamespace(host=None, config=NodeConfig(region="u33d"), peer_id="me",
                           liveness=SimpleNamespace(min_rtt_s={}))
    client = FleetClient(node, client_model, ClientConfig(verify=False))  # type: ignore[arg-type]
    state = {"y": "joining"}

    def candidates() -> list[Candidate]:
        return [dataclasses.replace(candidate("x", 0, best=False), end=10),
                dataclasses.replace(candidate("y", 10, best=False), state=state["y"]),
                dataclasses.replace(candidate("z", 20, best=False), end=25)]

    client.candidates = candidates  # type: ignore[method-assign]
    client.avoid("z")  # banned: covers nothing either
    assert client.uncovered_blocks() == list(range(10, 30))
    state["y"] = "online"
    assert client.uncovered_blocks() == []
    assert [h.peer_id for h in client.find_route()] == ["x", "y"]


def test_a_peer_whose_session_open_failed_is_the_last_resort_where_it_is_the_only_host(
        client_model: ClientModel) -> None:
    """One host per block (x, y): a failed open (network) avoids x, but routing still takes it
    when nothing else serves its blocks. With a second host of block 0, that one is taken. A
    ban for anything else (wrong outputs, a failed step) excludes x outright."""
    node = SimpleNamespace(host=None, config=NodeConfig(region="u33d"), peer_id="me",
                           liveness=SimpleNamespace(min_rtt_s={}))
    client = FleetClient(node, client_model, ClientConfig(verify=False))  # type: ignore[arg-type]
    hosts = {"x": (0, 10), "y": (10, 30)}

    def candidates() -> list[Candidate]:
        return [dataclasses.replace(candidate(p, a, best=False), end=b) for p, (a, b) in hosts.items()]

    client.candidates = candidates  # type: ignore[method-assign]
    client.avoid("x", unreachable=True)
    assert "x" in client.banned()
    assert [h.peer_id for h in client.find_route()] == ["x", "y"]
    hosts["x2"] = (0, 10)
    assert [h.peer_id for h in client.find_route()] == ["x2", "y"]
    del hosts["x2"]
    client.avoid("x")  # now for a fault
    with pytest.raises(NoRoute, match="banned"):
        client.find_route()
