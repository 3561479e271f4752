"""Misbehaviour reports on the wire: the report topic's checks (pure), what receivers remember, how
routing uses it, and real in-process nodes gossiping reports built from real model rows and keys."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idlefleet.node.faults import ENV_GUARD, FaultInjector
from idlefleet.node.runtime.node import Node
from idlefleet.p2p.identity import create_key_file, peer_id_of
from idlefleet.protocols import wire
from idlefleet.protocols.errors import LocalProtocolError, RecordRejected, RemoteProtocolError
from idlefleet.protocols.receipts import MisbehaviourReport
from idlefleet.protocols.reports import (
    MAX_AGE_S,
    REPORT_TOPIC,
    Accusations,
    check_report_gossip,
    encode_report_gossip,
    report_digest,
    report_still_current,
)
from idlefleet.protocols.routing import Candidate, find_route, mark_accused
from idlefleet.protocols.tensors import encode_hidden
from idlefleet.protocols.verification import StepCommitment, row_digests, rows_root
from tests.factories import running_fleet
from tests.test_fuzz import values
from tests.test_notice_hints import node_config
from tests.test_verification import proof

MODEL = "gguf-sha256:" + "cd" * 32
NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def rows(model_file: Any) -> dict[str, np.ndarray]:
    """Real rows of SmolLM2's blocks [10, 12) for positions 3..6: the second host's prefill of the
    window, the referee's one-position-at-a-time decode, and a corrupting server's output."""
    from idlefleet.node.model.stage import load_stage

    stage = load_stage(model_file, 10, 12)
    x = np.random.default_rng(0).standard_normal((4, 576)).astype(np.float32) * 3
    window = stage.forward(x, stage.new_cache(), 0)
    cache = stage.new_cache()
    decoded = np.concatenate([stage.forward(x[i:i + 1], cache, i) for i in range(4)])
    bad = FaultInjector("corrupt", environ={ENV_GUARD: "yes"}).apply(x, window)
    return {"x": x, "window": window, "decoded": decoded, "bad": bad}


def build_report(rows: dict[str, np.ndarray], reporter: Ed25519PrivateKey, accused: Ed25519PrivateKey,
                 witnesses: tuple[Ed25519PrivateKey, Ed25519PrivateKey] | None = None, *,
                 honest_accused: bool = False) -> bytes:
    """A report by ``reporter`` (the client) that ``accused`` returned a wrong row at position 5:
    three real step commitments over the same inputs (positions 3..6) and their row proofs."""
    w1, w2 = witnesses or (Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate())
    client = peer_id_of(reporter)
    parts = []
    for key, output in ((accused, rows["window"] if honest_accused else rows["bad"]),
                        (w1, rows["window"]), (w2, rows["decoded"])):
        tin, tout = encode_hidden(rows["x"]), encode_hidden(output)
        c = StepCommitment(peer_id_of(key), client, MODEL, 10, 12, 1, 3, 4,
                           rows_root(row_digests(tin)), rows_root(row_digests(tout)))
        parts.append((c.encode(c.sign(key)), proof(2, tin, tout)))
    report = MisbehaviourReport(client, 5, parts[0][0], (parts[1][0], parts[2][0]),
                                (parts[0][1], parts[1][1], parts[2][1]))
    return report.encode(reporter)


def check(data: bytes, origin: str, now: float = NOW, *, seen: frozenset[bytes] = frozenset(),
          budget: bool = True) -> Any:
    return check_report_gossip(data, origin, now, seen=seen.__contains__, budget=lambda _: budget)


# --- the topic's checks, pure ------------------------------------------------------------------------

def test_a_valid_report_is_accepted_once_and_only_from_its_reporter(rows: dict[str, np.ndarray]) -> None:
    reporter, accused, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    report = build_report(rows, reporter, accused)
    data = encode_report_gossip(report, reporter, NOW)
    got = check(data, peer_id_of(reporter))
    assert got.accused == peer_id_of(accused) and got.report.reporter == peer_id_of(reporter)
    assert got.digest == report_digest(report) and got.published_at == NOW
    assert check(data, peer_id_of(reporter), seen=frozenset({got.digest})) is None  # a replay
    # Re-wrapped by the reporter later: still the same report, still a duplicate.
    assert check(encode_report_gossip(report, reporter, NOW + 5), peer_id_of(reporter), NOW + 5,
                 seen=frozenset({got.digest})) is None

    def reason(data: bytes, origin: str = peer_id_of(reporter), now: float = NOW, **kw: Any) -> str:
        with pytest.raises(RecordRejected) as e:
            check(data, origin, now, **kw)
        return e.value.reason

    # Someone else publishing the reporter's message, or wrapping the report under its own key.
    assert reason(data, peer_id_of(stranger)) == "bad_signature"
    assert reason(encode_report_gossip(report, stranger, NOW), peer_id_of(stranger)) == "source_mismatch"
    assert reason(data, now=NOW + MAX_AGE_S + 1) == "stale_report"  # replayed after its window
    assert reason(data, now=NOW - 60) == "stale_report"  # from the future
    assert reason(data, budget=False) == "rate_limited"
    honest = build_report(rows, reporter, accused, honest_accused=True)  # nothing wrong: no proof
    assert reason(encode_report_gossip(honest, reporter, NOW)) == "bad_report"
    tampered = report.replace(peer_id_of(accused).encode(), peer_id_of(stranger).encode())
    assert reason(encode_report_gossip(tampered, reporter, NOW)) == "bad_report"
    for garbage in (b"", b"\x92\x01\x02", wire.encode_envelope("misbehaviour", {"report": report}),
                    wire.encode_envelope("capacity", {"record": b"x"})):
        assert reason(garbage) == "malformed"
    assert report_still_current(data, NOW) and not report_still_current(data, NOW + MAX_AGE_S - 30)
    assert not report_still_current(b"junk", NOW)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(st.data())
def test_mutated_reports_raise_only_remote_errors(rows: dict[str, np.ndarray], data: st.DataObject) -> None:
    """A publisher's signature over any mutation of a real report reaches ``verify_report``: it
    refuses every one with a remote error (never another exception)."""
    key = KEYS[0]
    report = bytearray(REPORT.get("bytes") or REPORT.setdefault("bytes", build_report(rows, key, KEYS[1])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(report) - 1))
        report[i] = data.draw(st.integers(0, 255))
    body = data.draw(st.one_of(st.just({}), st.dictionaries(st.sampled_from(["report", "published_at", "sig",
                                                                               "x"]), values, max_size=4)))
    messages = [encode_report_gossip(bytes(report), key, NOW)]
    with contextlib.suppress(LocalProtocolError):  # values msgpack cannot carry (ints >= 2**64)
        messages.append(wire.encode_envelope("misbehaviour", body))
    for message in messages:
        try:
            got = check(message, peer_id_of(key))
        except RemoteProtocolError:
            continue
        assert got is None or got.accused == peer_id_of(KEYS[1])  # a mutation that changed nothing


KEYS = [Ed25519PrivateKey.generate() for _ in range(2)]
REPORT: dict[str, bytes] = {}


def test_the_documented_gossip_vector() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    after = doc.split("<!-- test-vector: misbehaviour-gossip -->", 1)[1]
    block = after.split("```text", 1)[1].split("```")[0]
    key = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    assert encode_report_gossip(b"example", key, 1_700_000_000.0) == bytes.fromhex("".join(block.split()))


def test_accusations_last_longer_with_more_reporters_and_stay_bounded() -> None:
    acc = Accusations(base_s=600, max_s=3600, memory_s=7200, max_accused=3)
    assert not acc.is_accused("x", NOW)
    assert acc.accuse("x", "r1", NOW) == 1
    assert acc.until("x", NOW) == NOW + 600
    assert acc.accuse("x", "r1", NOW + 10) == 1  # the same reporter again: not a second voice
    assert acc.until("x", NOW) == NOW + 610
    assert acc.accuse("x", "r2", NOW + 20) == 2 and acc.until("x", NOW) == NOW + 20 + 1200
    for r in ("r3", "r4", "r5"):
        acc.accuse("x", r, NOW + 20)
    assert acc.until("x", NOW) == NOW + 20 + 3600  # capped at max_s
    assert not acc.is_accused("x", NOW + 20 + 3600)
    for peer in ("a", "b", "c"):  # one reporter accusing many: bounded, the longest kept
        acc.accuse(peer, "r1", NOW + 30)
    assert len(acc) == 3 and acc.is_accused("x", NOW + 30)
    acc.prune(NOW + 30 + 7200)
    assert len(acc) == 0


def test_routing_uses_an_accused_peer_only_as_a_last_resort() -> None:
    def cand(peer: str, rtt: float, accused: bool = False) -> Candidate:
        return Candidate(peer, 0, 30, rtt, 100.0, 0.1, 0.9, True, "online", None, False, "u33d",
                         accused=accused)

    assert find_route([cand("a", 0.001), cand("b", 0.01)], 0, 30, now=NOW)[0].peer_id == "a"
    assert find_route([cand("a", 0.001, True), cand("b", 0.01)], 0, 30, now=NOW)[0].peer_id == "b"
    assert find_route([cand("a", 0.001, True)], 0, 30, now=NOW)[0].peer_id == "a"  # still usable


# --- real nodes ----------------------------------------------------------------------------------------

async def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def report_mesh(nodes: list[Node]) -> None:
    """Every node has a gossip peer on the report topic (the mesh forms within a heartbeat)."""
    await wait_until(lambda: all(n.host.gossip_peers(REPORT_TOPIC) for n in nodes))


def rank_of(node: Node, accused: str, other: str) -> list[str]:
    """How ``node``'s client would order two equal hosts of every block (the accused has the lower
    round trip, so it wins unless accused)."""
    now = time.time()
    cands = mark_accused([  # as FleetClient.candidates marks them
        Candidate(accused, 0, 30, 0.001, 100.0, 0.1, 0.9, True, "online", None, False, "u33d"),
        Candidate(other, 0, 30, 0.002, 100.0, 0.1, 0.9, True, "online", None, False, "u33d")],
        lambda peer: node.accusations.is_accused(peer, now))
    first = find_route(cands, 0, 30, now=now)[0].peer_id
    return [first, other if first == accused else accused]


async def test_a_gossiped_report_lowers_the_accused_everywhere_and_attacks_change_nothing(
        tmp_path: Path, rows: dict[str, np.ndarray]) -> None:
    keys = [create_key_file(tmp_path / f"node{i}.key") for i in range(5)]
    # Node 3 is the accused itself; node 4 a stranger that attacks the topic (a real node, so it
    # stays connected: it answers heartbeats).
    reporter, receivers, accused, stranger = 0, (1, 2), 3, 4
    ids = [peer_id_of(k) for k in keys]
    other = peer_id_of(Ed25519PrivateKey.generate())
    async with running_fleet(lambda i, boot: node_config(tmp_path, i, boot), 5) as nodes:
        await report_mesh(nodes)
        for i in receivers:
            assert rank_of(nodes[i], ids[accused], other) == [ids[accused], other]
        report = build_report(rows, keys[reporter], keys[accused])
        # Our own client's bugs are ours: a report that does not verify, or that another key
        # signed, is logged and not sent.
        await nodes[reporter].report_misbehaviour(b"not a report")
        await nodes[reporter].report_misbehaviour(build_report(rows, keys[1], keys[accused]))
        assert len(nodes[reporter].accusations) == 0
        await nodes[reporter].report_misbehaviour(report)
        await nodes[reporter].report_misbehaviour(report)  # reported twice: applied and sent once
        await wait_until(lambda: all(nodes[i].accusations.is_accused(ids[accused], time.time())
                                     for i in receivers))
        for i in (reporter, *receivers):
            assert rank_of(nodes[i], ids[accused], other) == [other, ids[accused]]
            assert nodes[i].accusations.reporters(ids[accused], time.time()) == 1
        # The accused learns it too; it cannot avoid itself, it tells its owner.
        await wait_until(lambda: '"accused_us"' in (tmp_path / "node3.events.jsonl").read_text())
        assert len(nodes[accused].accusations) == 0
        assert '"peer_accused"' in (tmp_path / "node1.events.jsonl").read_text()
        assert all(n.rejected.total() == 0 for n in nodes)

        rogue, rogue_key = nodes[stranger], keys[stranger]
        honest_nodes = nodes[:stranger]
        await wait_until(lambda: {n.peer_id for n in honest_nodes} <= rogue.host.gossip_peers(REPORT_TOPIC))
        # The stranger as a reporter with real (sybil) evidence against 5 peers: its budget lets 3
        # through at every node; the others are refused there and not forwarded.
        victims = [Ed25519PrivateKey.generate() for _ in range(5)]
        for victim in victims:
            framed = build_report(rows, rogue_key, victim)
            await rogue.host.publish(REPORT_TOPIC, encode_report_gossip(framed, rogue_key, time.time()))
        await wait_until(lambda: all(n.rejected["report_rate_limited"] >= 2 for n in honest_nodes))
        victim_ids = {peer_id_of(v) for v in victims}
        for i in (reporter, *receivers):
            accused_now = set(nodes[i].accusations.accused(time.time())) - {ids[accused]}
            assert accused_now <= victim_ids and len(accused_now) == 3, i
        # Then a flood of invalid reports and replays: none is applied, nothing crashes.
        before = [set(n.accusations.accused(time.time())) for n in honest_nodes]
        honest = build_report(rows, rogue_key, keys[1], honest_accused=True)  # frames node 1
        junk = [encode_report_gossip(report, keys[reporter], time.time()),  # re-published by it
                encode_report_gossip(report, rogue_key, time.time()),  # "I am its reporter"
                encode_report_gossip(honest, rogue_key, time.time()),  # evidence proving nothing
                encode_report_gossip(report, rogue_key, time.time() - 2 * MAX_AGE_S),  # stale
                b"\x00" * 100]
        for i in range(100):  # in about 3 s
            await rogue.host.publish(REPORT_TOPIC, junk[i % len(junk)])
            await trio.sleep(0.03)

        def dropped(node: Node) -> int:
            return (sum(v for k, v in node.rejected.items() if k.startswith("report_"))
                    + node.host.stats.gossip_rate_limited)

        # 60 of the 100 are invalid (the other 40 are copies of a report already applied: dropped
        # silently, like any duplicate).
        with trio.move_on_after(15):  # a loaded machine may still be delivering the flood
            while not all(dropped(n) >= 55 for n in honest_nodes):
                await trio.sleep(0.1)
        for n, accused_before in zip(honest_nodes, before, strict=True):
            assert set(n.accusations.accused(time.time())) == accused_before
            assert n.accusations.reporters(ids[accused], time.time()) in (0, 1)  # replays: no vote
            assert n.host.stats.handler_crashes == 0
            assert dropped(n) >= 30, (dropped(n), dict(n.rejected), n.host.stats)
        # Still a working fleet: a second honest reporter extends the accusation everywhere.
        second = build_report(rows, keys[2], keys[accused])
        await nodes[2].report_misbehaviour(second)
        await wait_until(lambda: all(nodes[i].accusations.reporters(ids[accused], time.time()) == 2
                                     for i in (0, 1)))
        assert not rogue.accusations.is_accused(ids[1], time.time())
