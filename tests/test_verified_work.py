"""Verified work across an in-process fleet of real libp2p nodes (issue 10, item 1): servers sign
every step result, the client re-computes each remote hop's windows on an independent host, a
referee settles a mismatch, the wrong peer is banned and reported, and the generation rolls back
to the last verified position, so it returns exactly the tokens of a local run."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.client.config import ClientConfig, ClientModel
from idlefleet.node.client.fleet import FleetClient
from idlefleet.node.config import NodeConfig
from idlefleet.node.faults import FaultInjector
from idlefleet.node.model.generate import Generation
from idlefleet.node.model.sampling import SamplingParams
from idlefleet.node.model.stage import Stage
from idlefleet.node.runtime.node import Node, open_node
from idlefleet.node.serve.server import StageServer
from idlefleet.p2p.errors import NetworkError
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.host import HostConfig, open_host
from idlefleet.p2p.liveness import HEARTBEAT_PROTOCOL
from idlefleet.protocols import session as S
from idlefleet.protocols.messages import Heartbeat, HeartbeatAck
from idlefleet.protocols.receipts import verify_report
from idlefleet.protocols.routing import Candidate
from idlefleet.protocols.tensors import TensorLimits, decode_hidden, encode_hidden
from idlefleet.protocols.verification import StepCommitment, TrustBook, row_digests, rows_root
from idlefleet.protocols.wire import Envelope
from tests.test_client_checks import DirectClient, fleet

PROMPT = "The capital of France is"
NEW = 24
WINDOW = 8
SPANS = [(0, 15), (15, 30)] * 3  # every block hosted three times: a verifier and a referee


async def heartbeat_ack(_peer: str, env: Envelope) -> tuple[str, dict[str, Any]]:
    """Answer the client node's heartbeats (p2p/liveness.py), so it keeps these bare hosts."""
    return "heartbeat_ack", HeartbeatAck(Heartbeat.from_body(env.body).nonce).to_body()


class FixedFleetClient(FleetClient):
    """A FleetClient of a real node whose candidates are the given stage servers (bare libp2p
    hosts, no gossip: a light fleet); ``fast`` claims to be the best host, so routes start on it.
    Everything it does on the network is real."""

    def __init__(self, node: Node, model: ClientModel, config: ClientConfig,
                 hosts: dict[str, tuple[str, int, int]], fast: str | None = None) -> None:
        super().__init__(node, model, config)
        self.hosts, self.fast = hosts, fast

    def candidates(self) -> list[Candidate]:
        return [Candidate(peer, start, end, 0.0001 if peer == self.fast else 0.001,
                          1e6 if peer == self.fast else 100.0, 0.0 if peer == self.fast else 0.2, 1.0, True,
                          "online", None, False, "u33d")
                for peer, (_addr, start, end) in self.hosts.items()]

    async def ensure_connected(self, peer_id: str) -> None:
        if peer_id not in self.node.host.connected_peers():
            await self.node.host.connect(self.hosts[peer_id][0])


@asynccontextmanager
async def stage_hosts(whole_model: Stage, spans: list[tuple[int, int]] = SPANS
                      ) -> AsyncIterator[tuple[dict[str, tuple[str, int, int]], dict[str, StageServer]]]:
    """A signing StageServer per span of ``spans``, each on its own libp2p host (its own key), all
    sharing one copy of the weights."""
    hosts: dict[str, tuple[str, int, int]] = {}
    servers: dict[str, StageServer] = {}
    async with AsyncExitStack() as stack:
        for start, end in spans:
            key = Ed25519PrivateKey.generate()
            server = StageServer(whole_model.sub_stage(start, end), key=key)
            host = await stack.enter_async_context(open_host(key, HostConfig()))
            host.set_stream_handler(S.STAGE_PROTOCOL, server.handle)
            host.set_request_handler(HEARTBEAT_PROTOCOL, "heartbeat", heartbeat_ack)  # the client's liveness
            hosts[host.peer_id] = (host.multiaddrs()[0], start, end)
            servers[host.peer_id] = server
        yield hosts, servers


def capture_reports(node: Node) -> list[bytes]:
    """Every misbehaviour report ``node``'s client makes, in order (still applied and gossiped)."""
    reports: list[bytes] = []
    original = node.report_misbehaviour

    async def report(raw: bytes) -> None:
        reports.append(raw)
        await original(raw)

    node.report_misbehaviour = report  # type: ignore[method-assign]
    return reports


def chaos(kind: str) -> FaultInjector:
    return FaultInjector(kind, environ={"IDLEFLEET_CHAOS": "yes"})


async def run(client: FleetClient, *, strict: bool = False) -> tuple[list[int], Any]:
    """One generation; returns the streamed ids and the FleetGeneration."""
    generation = client.stream(PROMPT, max_new_tokens=NEW, strict=strict)
    streamed = []
    async with aclosing(generation.run()) as tokens:
        async for token, _ in tokens:
            if token >= 0:
                streamed.append(token)
    return streamed, generation


async def test_a_faulty_peer_is_caught_banned_reported_and_rolled_back(
        tmp_path: Path, whole_model: Stage, client_model: ClientModel, local_greedy: Any) -> None:
    want = list(local_greedy(PROMPT, NEW))
    async with stage_hosts(whole_model) as (hosts, servers), open_node(NodeConfig(
            key_file=tmp_path / "client.key", vehicle="sim:parked")) as me:
        reports = capture_reports(me)
        cfg = ClientConfig(verify_window=WINDOW)
        bad_id = next(p for p, (_a, start, _e) in hosts.items() if start == 0)
        server = servers[bad_id]

        def new_client() -> FleetClient:
            return FixedFleetClient(me, client_model, cfg, hosts, fast=bad_id)

        for kind in ("corrupt", "skip", "stale"):
            server.fault = chaos(kind)
            client = new_client()
            streamed, generation = await run(client)
            result = generation.result
            assert result.new_ids == want, kind
            v = result.verification
            assert bad_id in client.banned(), kind
            assert v["banned_peers"] == [bad_id], (kind, v)
            assert v["mismatches"] >= 1 and v["reports"] == 1 and v["undecided"] == 0, (kind, v)
            assert v["rolled_back_tokens"] >= 1 and v["unverified_tokens"] == 0, (kind, v)
            verifier = generation.pipeline.verifier
            assert verifier.stats.detection_lags and max(verifier.stats.detection_lags) <= 64, kind
            faulty = [c.hop.tally for c in verifier.checks if c.hop.peer_id == bad_id]
            assert faulty and all(t.rejected > 0 and t.unverified == 0 for t in faulty), (kind, faulty)
            honest = [c.hop for c in verifier.checks if c.hop.peer_id != bad_id]
            assert all(h.tally.rejected == 0 and h.tally.verified > 0 for h in honest), kind
            # The hops that served the end: every position of the final sequence verified on them.
            positions = len(result.prompt_ids) + NEW - 1
            for hop in generation.pipeline.hops:
                assert hop.peer_id != bad_id
                assert hop.tally.verified >= positions and hop.tally.rejected == 0, (kind, hop.tally)
            # A non-strict stream is not held back: it showed the discarded tokens too.
            assert len(streamed) == NEW + v["rolled_back_tokens"], kind
            raw = reports[-1]
            report, accused = verify_report(raw)
            assert accused == bad_id and report.reporter == me.peer_id

        # Strict: the stream itself holds every token until its work is verified.
        server.fault = chaos("corrupt")
        client = new_client()
        streamed, generation = await run(client, strict=True)
        assert streamed == want == generation.result.new_ids
        assert generation.result.verification["banned_peers"] == [bad_id]
        assert len(reports) == 4

        # A lying verifier host: the referee sides with the primary; the verifier is banned and
        # reported, the referee verifies from then on, and nothing is rolled back.
        server.fault = None
        liar, _referee, first = [p for p, (_a, start, _e) in hosts.items() if start == 0]
        servers[liar].fault = chaos("corrupt")  # equal candidates: the first one verifies
        client = FixedFleetClient(me, client_model, cfg, hosts, fast=first)
        streamed, generation = await run(client)
        v = generation.result.verification
        assert streamed == want == generation.result.new_ids
        assert v["banned_peers"] == [liar] and v["rolled_back_tokens"] == 0 and v["reports"] == 1, v
        assert verify_report(reports[-1])[1] == liar
        assert all(h.tally.verified >= len(generation.result.prompt_ids) + NEW - 1
                   for h in generation.pipeline.hops)
        servers[liar].fault = None

        # No fault: across several generations (trust grows), no honest peer is ever accused.
        server.fault = None
        client = FixedFleetClient(me, client_model, cfg, hosts)
        accused = checked = 0
        for _ in range(3):
            streamed, generation = await run(client)
            v = generation.result.verification
            assert streamed == want == generation.result.new_ids
            accused += v["mismatches"] + len(v["banned_peers"]) + v["reports"]
            checked += v["windows_checked"]
        assert accused == 0 and checked >= 6, (accused, checked)

        # A client that trusts every peer (a long run of valid windows, drawn at the minimum rate)
        # samples hop sessions, not windows: both of its sessions were drawn out here (seed 5),
        # so no verifier session re-computes anything; the tokens are the same, left unverified.
        client = FixedFleetClient(me, client_model, cfg, hosts)
        client.trust = TrustBook(min_rate=0.1, seed=5)  # draws 0.62 and 0.74: above the rate
        for peer in hosts:
            for _ in range(400):
                client.trust.valid(peer)
        streamed, generation = await run(client)
        v = generation.result.verification
        assert streamed == want == generation.result.new_ids
        assert (v["sessions_shadowed"], v["sessions_skipped"], v["windows_checked"]) == (0, 2, 0), v
        assert v["unverified_tokens"] > 0 and v["mismatches"] == 0, v
        assert all(c.verifier is None for c in generation.pipeline.verifier.checks)
        assert all(h.tally.verified == 0 for h in generation.pipeline.hops)
        assert len(reports) == 5


def lying_handler(stage: Stage, key: Ed25519PrivateKey, peer_id: str, lie: str) -> Any:
    """A peer that computes the right outputs and signs a lie: another key, or another position."""
    async def handle(fs: FramedStream) -> None:
        cache = req = None
        try:
            while True:
                env = await fs.receive(timeout=10)
                if env.kind == "session_open":
                    req = S.OpenRequest.from_body(env.body)
                    cache = stage.new_cache()
                    await fs.send("session_opened", {"session": 1, "start": req.start, "end": req.end,
                                                     "hidden": stage.config.hidden_size}, timeout=5)
                elif env.kind == "step" and req is not None and cache is not None:
                    step = S.Step.from_body(env.body)
                    x = decode_hidden(step.hidden, TensorLimits())
                    y = await trio.to_thread.run_sync(stage.forward, x, cache, step.position)
                    out = encode_hidden(y, req.dtype)
                    signer = key if lie != "key" else Ed25519PrivateKey.generate()
                    commitment = StepCommitment(peer_id, fs.peer_id, req.model_id, req.start, req.end, 1,
                                                step.position + (lie == "position"), x.shape[0],
                                                rows_root(row_digests(step.hidden)),
                                                rows_root(row_digests(out)))
                    result = S.StepResult(step.position, out, False, commitment.sign(signer))
                    await fs.send("step_result", result.to_body(), timeout=5)
                else:
                    return
        except NetworkError:
            pass
    return handle


@pytest.mark.parametrize("lie", ["key", "position"])
async def test_a_lying_signature_is_a_protocol_fault_of_that_peer(
        whole_model: Stage, client_model: ClientModel, local_greedy: Any, lie: str,
        caplog: pytest.LogCaptureFixture) -> None:
    key = Ed25519PrivateKey.generate()
    from idlefleet.protocols.peerid import peer_id_from_public_key

    peer_id = peer_id_from_public_key(key.public_key().public_bytes_raw())
    with caplog.at_level(logging.WARNING, logger="idlefleet.node.client"):
        async with fleet(whole_model, lying_handler(whole_model, key, peer_id, lie), hostile_key=key) as (
                me, peers, _events):
            client = DirectClient(me, client_model, ClientConfig(), peers)
            result = await client.generate(PROMPT, max_new_tokens=4)
    assert result.failovers == 1 and peer_id in client.banned()
    assert [h["peer_id"] for h in result.route] != [peer_id]
    assert result.new_ids == list(local_greedy(PROMPT, 4))
    assert "step commitment: bad signature" in caplog.text



def test_a_rewound_generation_continues_with_the_same_tokens(whole_model: Stage, client_model: ClientModel,
                                                             local_greedy: Any) -> None:
    """``Generation.rewind`` (the rollback's sans-IO half): back to a position inside the prompt or
    after it, the same greedy tokens follow; a position never run is refused."""
    want = list(local_greedy(PROMPT, 6))
    ids = client_model.tokenizer.encode(PROMPT)
    gen = Generation(client_model.head, ids, SamplingParams(max_new_tokens=6))
    cache = whole_model.new_cache()
    for rewind_to in (len(ids) + 2, 3, None):
        while not gen.done:
            step = gen.next_input()
            gen.feed(whole_model.forward(step.hidden, cache, step.position))
        assert gen.new_ids == want
        if rewind_to is not None:
            gen.rewind(rewind_to)
            assert not gen.done and gen.next_input().position == rewind_to
            assert gen.new_ids == want[:max(0, rewind_to + 1 - len(ids))]
    with pytest.raises(ValueError, match="cannot rewind"):
        gen.rewind(len(ids) + 6)


async def test_with_every_block_hosted_only_twice_the_client_is_the_referee(
        tmp_path: Path, whole_model: Stage, client_model: ClientModel, local_greedy: Any) -> None:
    """No third host to settle a mismatch: the client recomputes the disputed row from its own
    model file, convicts the wrong peer, reports it with three signed rows, and rolls back."""
    want = list(local_greedy(PROMPT, NEW))
    async with stage_hosts(whole_model, [(0, 15), (15, 30)] * 2) as (hosts, servers), open_node(
            NodeConfig(key_file=tmp_path / "client.key", vehicle="sim:parked")) as me:
        reports = capture_reports(me)
        bad_id = next(p for p, (_a, start, _e) in hosts.items() if start == 0)
        servers[bad_id].fault = chaos("corrupt")
        client = FixedFleetClient(me, client_model, ClientConfig(verify_window=WINDOW), hosts, fast=bad_id)
        _, generation = await run(client)
        result = generation.result
        assert result.new_ids == want
        v = result.verification
        assert v["banned_peers"] == [bad_id], v
        assert v["local_referee"] == 1 and v["reports"] == 1 and v["undecided"] == 0, v
        assert max(generation.pipeline.verifier.stats.detection_lags) <= 64
        assert len(reports) == 1
        _, accused = verify_report(reports[0])  # three signed rows: the accused, the verifier, us
        assert accused == bad_id


async def test_the_trust_book_is_kept_in_the_data_directory(
        tmp_path: Path, whole_model: Stage, client_model: ClientModel, local_greedy: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """What one run's checks taught the client about its peers is there for the next run (a
    one-shot ``idlefleet generate`` would otherwise treat every peer as new, and re-compute all of
    its work): saved atomically, owner-only, after each generation; a damaged file is ignored
    with a warning (every peer new again: more checks, never fewer)."""
    want = list(local_greedy(PROMPT, NEW))
    data = tmp_path / "data"
    async with stage_hosts(whole_model) as (hosts, _servers), open_node(NodeConfig(
            data_dir=data, vehicle="sim:parked", serve=False)) as me:
        path = data / "trust.json"
        first = FixedFleetClient(me, client_model, ClientConfig(verify_window=WINDOW), hosts)
        assert first.trust_file == path and len(first.trust) == 0
        _, generation = await run(first)
        assert generation.result.new_ids == want
        checked = {p: first.trust.statistics(p) for p in hosts if first.trust.statistics(p)["valid"]}
        assert len(checked) >= 2, checked  # the route's hops, checked on other hosts
        v = generation.result.verification
        assert v["mismatches"] == 0 and v["windows_checked"] > 0, v
        # Each agreeing window is a valid window of the hop and of the host that re-ran it.
        assert sum(first.trust.statistics(p)["valid"] for p in hosts) == 2 * v["windows_checked"]
        assert path.stat().st_mode & 0o777 == 0o600 and not first.trust.changed

        second = FixedFleetClient(me, client_model, ClientConfig(verify_window=WINDOW), hosts)
        assert {p: second.trust.statistics(p) for p in checked} == checked

        path.write_text('{"version": 1, "peers": [["x", 5, 1, 0]]}')  # a streak over its windows
        with caplog.at_level(logging.WARNING, logger="idlefleet.node.client.fleet"):
            third = FixedFleetClient(me, client_model, ClientConfig(verify_window=WINDOW), hosts)
        assert len(third.trust) == 0
        assert any("trust book" in r.message and "ignored" in r.message for r in caplog.records)
        without = FixedFleetClient(me, client_model, ClientConfig(verify=False), hosts)
        assert without.trust_file is None  # nothing is checked, nothing is learned
        elsewhere = FixedFleetClient(me, client_model, ClientConfig(trust_file=tmp_path / "t.json"), hosts)
        assert elsewhere.trust_file == tmp_path / "t.json" and len(elsewhere.trust) == 0
