"""The receipt exchange when a hop session closes (issue 10 item 2): the server's checks (sans-IO), the
exchange between a real fleet client and a real stage server over libp2p with real keys and the real
model, hostile proposals, and the owner's export verified by a fresh process."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.client.config import ClientConfig, ClientModel
from idlefleet.node.client.pipeline import Pipeline
from idlefleet.node.model.stage import Stage
from idlefleet.node.owner.ledger import Ledger, ReceiptDesk
from idlefleet.node.serve.server import StageServer
from idlefleet.p2p.errors import RemoteError
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.p2p.identity import peer_id_of
from idlefleet.protocols import session as S
from idlefleet.protocols import wire
from idlefleet.protocols.receipts import (
    CREDIT_FLOPS,
    Receipt,
    ReceiptRefused,
    SessionWork,
    check_proposal,
    decode_receipt,
    flops_per_token_block,
    propose,
)
from idlefleet.protocols.tensors import encode_hidden
from tests.test_client_checks import DirectClient
from tests.test_verification import IDS, KEYS, MODEL

PROMPT = "The capital of France is"
SMOL_FLOPS = 7_077_888.0  # per token per block: 2 x (2 x 576 x 576 + 2 x 576 x 192 + 3 x 576 x 1536)


# --- the server's decision, sans-IO ------------------------------------------------------------------

T_OPEN = 1_700_000_000.0
WORK = SessionWork(server=IDS[1], client=IDS[0], model_id=MODEL, start=10, end=20, session=7,
                   opened_at=T_OPEN, tokens=100, flops_per_token_block=SMOL_FLOPS)


def proposed(key: Ed25519PrivateKey = KEYS[0], **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        server=IDS[1], client=IDS[0], model_id=MODEL, start=10, end=20, session=7, opened_at=T_OPEN + 0.01,
        closed_at=T_OPEN + 60, tokens=100, block_steps=1000, flops=SMOL_FLOPS * 1000, verified=90,
        unverified=6, rejected=4)
    fields.update(changes)
    return propose(Receipt(**fields), key)


def test_smollm2_flops_per_token_block() -> None:
    assert flops_per_token_block(576, 9, 3, 64, 1536) == SMOL_FLOPS


def test_a_matching_proposal_is_accepted_whatever_the_clients_verdict() -> None:
    for verdict in ({}, {"verified": 0, "unverified": 0, "rejected": 100}):
        receipt, sig = check_proposal(proposed(**verdict), WORK, T_OPEN + 61)
        assert receipt.tokens == 100 and len(sig) == 64


@pytest.mark.parametrize(("body", "code", "why"), [
    (proposed(key=KEYS[2]), "bad_receipt", "bad signature"),
    (proposed(server=IDS[2]), "bad_receipt", "another server"),
    (proposed(client=IDS[2], key=KEYS[2]), "bad_receipt", "another server or client"),
    (proposed() | {"extra": 1}, "bad_receipt", "exactly body and client_sig"),
    (proposed() | {"body": b"\x80" * 3000}, "bad_receipt", "at most 2048"),
    (proposed() | {"body": b"\x81\xa1v\x01"}, "bad_receipt", "wrong fields"),
    (proposed() | {"client_sig": b"x" * 63}, "bad_receipt", "64 bytes"),
    (proposed(tokens=101, block_steps=1010, flops=SMOL_FLOPS * 1010, unverified=7), "receipt_mismatch",
     "tokens 101"),
    (proposed(session=8), "receipt_mismatch", "session"),
    (proposed(start=11, block_steps=900, flops=SMOL_FLOPS * 900), "receipt_mismatch", "blocks"),
    (proposed(flops=SMOL_FLOPS * 2000), "receipt_mismatch", "flops"),
    (proposed(opened_at=T_OPEN - 31), "receipt_mismatch", "clock"),
    (proposed(closed_at=T_OPEN + 100), "receipt_mismatch", "clock"),
])
def test_bad_proposals_are_refused_with_a_named_code(body: dict[str, Any], code: str, why: str) -> None:
    with pytest.raises(ReceiptRefused, match=why) as e:
        check_proposal(body, WORK, T_OPEN + 61)
    assert e.value.code == code


def test_a_session_that_computed_nothing_gets_no_receipt() -> None:
    with pytest.raises(ReceiptRefused, match="computed nothing"):
        check_proposal(proposed(tokens=0, block_steps=0, flops=0.0, verified=0, unverified=0, rejected=0),
                       replace(WORK, tokens=0), T_OPEN + 61)


# --- a real client and a real stage server over libp2p -----------------------------------------------

LOCAL = 28  # the client runs blocks [0, 28) itself; the server serves [28, 30)


@pytest.fixture(scope="module")
def served_stage(whole_model: Stage) -> Stage:
    """Blocks [28, 30). A remote hop of two blocks keeps every step far inside the client's step
    deadline on a loaded machine; the client's own 28 blocks run under no deadline."""
    return whole_model.sub_stage(LOCAL, 30)


@pytest.fixture(scope="module")
def split_model(whole_model: Stage, client_model: ClientModel) -> ClientModel:
    """The client's side: tokenizer, head, and blocks [0, 28) (sharing the weights)."""
    return replace(client_model, local=whole_model.sub_stage(0, LOCAL))


@dataclass
class Party:
    key: Ed25519PrivateKey
    host: Host
    ledger: Ledger

    @property
    def desk(self) -> ReceiptDesk:
        return ReceiptDesk(self.key, self.host.peer_id, self.ledger)


@asynccontextmanager
async def served(stage: Stage, tmp_path: Path, *, ledger: bool = True
                 ) -> AsyncIterator[tuple[Party, StageServer, Party]]:
    """A StageServer of ``stage`` that keeps a ledger (or none), and a client party, each on its own
    libp2p host with its own key and ledger."""
    async with AsyncExitStack() as stack:
        parties = []
        for name in ("server", "client"):
            key = Ed25519PrivateKey.generate()
            host = await stack.enter_async_context(open_host(key, HostConfig()))
            parties.append(Party(key, host, stack.enter_context(Ledger(tmp_path / name / "ledger.sqlite"))))
        server, client = parties
        desk = server.desk if ledger else ReceiptDesk(server.key, server.host.peer_id, None)
        stage_server = StageServer(stage, receipts=desk, key=server.key)
        server.host.set_stream_handler(S.STAGE_PROTOCOL, stage_server.handle)
        yield server, stage_server, client


def direct_client(server: Party, client: Party, model: ClientModel) -> DirectClient:
    peers = {server.host.peer_id: (server.host.multiaddrs()[0], False)}
    fleet = DirectClient(client.host, model, ClientConfig(local_blocks=model.local_blocks), peers)
    fleet.receipts = client.desk  # what a node gives its FleetClient (Node.receipts)
    return fleet


async def test_generation_leaves_the_same_double_signed_receipt_in_both_ledgers(
        tmp_path: Path, served_stage: Stage, split_model: ClientModel) -> None:
    async with served(served_stage, tmp_path) as (server, stage_server, client):
        fleet = direct_client(server, client, split_model)
        generation = fleet.stream(PROMPT, max_new_tokens=6)
        n = 0
        async with aclosing(generation.run()) as tokens:
            async for _ in tokens:
                n += 1
                if n == 3:  # the verifier's verdict so far: the first 5 positions checked out
                    assert generation.pipeline is not None
                    generation.pipeline.hops[0].tally.verify(5)
        (role_s, raw_s), = server.ledger.receipts()
        (role_c, raw_c), = client.ledger.receipts()
        assert (role_s, role_c) == ("server", "client")
        assert raw_s == raw_c  # the same bytes, both signatures
        r = decode_receipt(raw_s)
        prompt_len = len(split_model.tokenizer.encode(PROMPT))
        assert (r.server, r.client) == (server.host.peer_id, client.host.peer_id)
        assert (r.model_id, r.start, r.end) == (served_stage.model_id, LOCAL, 30)
        assert r.tokens == prompt_len + 5 == fleet.statistics().positions_computed[server.host.peer_id]
        assert (r.verified, r.unverified, r.rejected) == (5, r.tokens - 5, 0)
        assert r.block_steps == 2 * r.tokens and r.flops == SMOL_FLOPS * r.block_steps
        assert stage_server.stats.receipts == 1 and fleet.statistics().receipts_stored == 1
        totals = server.ledger.totals()
        assert totals["credits"]["verified"] == pytest.approx(SMOL_FLOPS * 2 * 5 / CREDIT_FLOPS)
        assert totals["token_counts"] == {"verified": 5, "unverified": r.tokens - 5, "rejected": 0}
        assert client.ledger.totals()["sessions"] == 0  # work it asked for is not its credit


async def test_a_hop_abandoned_after_verification_caught_it_gets_a_rejected_receipt(
        tmp_path: Path, served_stage: Stage, split_model: ClientModel) -> None:
    async with served(served_stage, tmp_path) as (server, _, client), trio.open_nursery() as nursery:
        fleet = direct_client(server, client, split_model)
        fleet.node.nursery = nursery  # a node's nursery runs the exchanges of abandoned hops
        pipeline = Pipeline(fleet, 16)
        await pipeline.open()
        x = np.random.default_rng(0).standard_normal((4, 576)).astype(np.float32)
        await pipeline.forward(x, 0)
        hop = pipeline.hops[0]
        hop.tally.reject()  # what the verifier does when the referee convicts the server
        await hop.abandon()  # in the background: failover does not wait for it
        with trio.fail_after(5):
            while fleet.statistics().receipts_pending or not server.ledger.receipts():
                await trio.sleep(0.01)
        (_, raw), = server.ledger.receipts()
        r = decode_receipt(raw)
        assert (r.tokens, r.verified, r.unverified, r.rejected) == (4, 0, 0, 4)
        assert server.ledger.totals()["credits"]["verified"] == 0.0
        assert client.ledger.receipts() == [("client", raw)]


async def open_session(host: Host, peer: str, stage: Stage) -> tuple[FramedStream, int, float]:
    opened_at = time.time()
    fs = await host.open_stream(peer, S.STAGE_PROTOCOL)
    await fs.send("session_open", S.OpenRequest(stage.model_id, 4, 6, 16).to_body(), timeout=5)
    reply = await fs.receive_reply(timeout=5)
    x = np.random.default_rng(1).standard_normal((3, 576)).astype(np.float32)
    await fs.send("step", S.Step(0, encode_hidden(x)).to_body(), timeout=5)
    assert (await fs.receive_reply(timeout=30)).kind == "step_result"
    return fs, reply.body["session"], opened_at


def receipt_for(server: str, client: str, stage: Stage, session: int, opened_at: float,
                **changes: Any) -> Receipt:
    fields: dict[str, Any] = dict(server=server, client=client, model_id=stage.model_id, start=4, end=6,
                                  session=session, opened_at=opened_at, closed_at=max(opened_at, time.time()),
                                  tokens=3, block_steps=6, flops=SMOL_FLOPS * 6, verified=0, unverified=3,
                                  rejected=0)
    fields.update(changes)
    return Receipt(**fields)


async def exchange(fs: FramedStream, body: dict[str, Any]) -> str:
    """Send a proposal (as bytes: our own encoder refuses oversized ones); the reply's kind, or the
    error code."""
    envelope = wire.pack({"v": 1, "k": "receipt_proposal", "b": body})
    await fs._stream.write(wire.frame(envelope))
    try:
        return (await fs.receive_reply(timeout=5)).kind
    except RemoteError as e:
        return e.code


async def test_hostile_proposals_are_refused_by_name_and_nothing_is_stored(
        tmp_path: Path, whole_model: Stage) -> None:
    stage = whole_model.sub_stage(4, 6)
    async with served(stage, tmp_path) as (server, stage_server, client):
        me, them = client.host.peer_id, server.host.peer_id
        await client.host.connect(server.host.multiaddrs()[0])
        stranger = Ed25519PrivateKey.generate()
        cases = [  # (what the client does, the code it gets)
            (lambda sid, t: propose(receipt_for(them, me, stage, sid, t, tokens=4, block_steps=8,
                                                flops=SMOL_FLOPS * 8, unverified=4), client.key),
             "receipt_mismatch"),  # claims more tokens than the server computed
            (lambda sid, t: propose(receipt_for(them, me, stage, sid + 1, t), client.key),
             "receipt_mismatch"),
            (lambda sid, t: propose(receipt_for(IDS[3], me, stage, sid, t), client.key), "bad_receipt"),
            (lambda sid, t: propose(receipt_for(them, me, stage, sid, t), stranger), "bad_receipt"),
            (lambda sid, t: propose(receipt_for(them, peer_id_of(stranger), stage, sid, t), stranger),
             "bad_receipt"),  # a receipt for another client, properly signed by it
            (lambda sid, t: {"body": b"\0" * 2100, "client_sig": b"\0" * 64}, "bad_request"),  # > 2048 B
        ]
        for make, code in cases:
            fs, sid, t = await open_session(client.host, them, stage)
            assert await exchange(fs, make(sid, t)) == code
            if code != "bad_request":  # the session stays (closing): the client may still close it
                await fs.send("session_close", {}, timeout=5)
                assert (await fs.receive(timeout=5)).kind == "session_closed"
            await fs.aclose()
        assert server.ledger.receipts() == [] and stage_server.stats.receipts == 0
        assert stage_server.stats.receipts_refused == {"receipt_mismatch": 2, "bad_receipt": 3}

        # One receipt per session: the second proposal, even a valid one, is refused.
        fs, sid, t = await open_session(client.host, them, stage)
        good = propose(receipt_for(them, me, stage, sid, t), client.key)
        assert await exchange(fs, good) == "receipt"
        assert await exchange(fs, propose(receipt_for(them, me, stage, sid, t, verified=3, unverified=0),
                                          client.key)) == "duplicate_receipt"
        assert len(server.ledger.receipts()) == 1
        # A step after the proposal is out of order: the session ends.
        fs, sid, t = await open_session(client.host, them, stage)
        assert await exchange(fs, propose(receipt_for(them, me, stage, sid, t), client.key)) == "receipt"
        x = np.zeros((1, 576), np.float32)
        await fs.send("step", S.Step(3, encode_hidden(x)).to_body(), timeout=5)
        with pytest.raises(RemoteError, match="bad_request"):
            await fs.receive_reply(timeout=5)
        assert len(server.ledger.receipts()) == 2


async def test_a_server_without_a_ledger_refuses_and_the_client_keeps_a_record(
        tmp_path: Path, served_stage: Stage, split_model: ClientModel) -> None:
    async with served(served_stage, tmp_path, ledger=False) as (server, stage_server, client):
        fleet = direct_client(server, client, split_model)
        await fleet.generate(PROMPT, max_new_tokens=2)
        assert stage_server.stats.receipts_refused == {"receipts_unsupported": 1}
        assert fleet.statistics().receipts_refused == {"receipts_unsupported": 1}
        assert client.ledger.receipts() == []
        (refused,) = client.ledger.refused()
        assert (refused["peer"], refused["reason"]) == (server.host.peer_id, "receipts_unsupported")


# --- the owner's export, checked by a third party ------------------------------------------------------

THIRD_PARTY = textwrap.dedent('''
    # Checks `idlefleet owner receipts --json` from PROTOCOL.md 1.1 and 7.3 alone (no idlefleet code).
    import base64, json, sys
    import msgpack
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"

    def public_key(peer_id):
        n = 0
        for ch in peer_id:
            n = n * 58 + ALPHABET.index(ch)
        raw = n.to_bytes(38, "big")
        assert raw[:6] == bytes.fromhex("002408011220"), peer_id
        return Ed25519PublicKey.from_public_bytes(raw[6:])

    export = json.load(sys.stdin)
    for r in export["receipts"]:
        outer = msgpack.unpackb(base64.b64decode(r["raw"]), raw=False)
        assert set(outer) == {"body", "server_sig", "client_sig"}
        assert outer["body"] == base64.b64decode(r["body"])
        body = msgpack.unpackb(outer["body"], raw=False)
        assert {k: v for k, v in body.items() if k != "v"} == r["fields"], (body, r["fields"])
        for party in ("server", "client"):
            domain = b"idlefleet/receipt/v1\\x00"
            public_key(body[party]).verify(outer[party + "_sig"], domain + outer["body"])
            assert outer[party + "_sig"].hex() == r[party + "_sig"]
    print(len(export["receipts"]))
''')


def owner_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "idlefleet.node.cli", "owner", *args],
                          capture_output=True, text=True, timeout=60)


async def test_owner_receipts_json_is_checked_signature_by_signature_by_a_fresh_process(
        tmp_path: Path, whole_model: Stage) -> None:
    stage = whole_model.sub_stage(4, 6)
    async with served(stage, tmp_path) as (server, _, client):
        me, them = client.host.peer_id, server.host.peer_id
        await client.host.connect(server.host.multiaddrs()[0])
        for _ in range(2):
            fs, sid, t = await open_session(client.host, them, stage)
            assert await exchange(fs, propose(receipt_for(them, me, stage, sid, t), client.key)) == "receipt"
    data_dir = tmp_path / "server"  # its ledger.sqlite is where a node keeps it
    data_dir.chmod(0o700)
    out = await trio.to_thread.run_sync(owner_cli, "receipts", "--json", "--data-dir", str(data_dir))
    assert out.returncode == 0, out.stderr
    export = json.loads(out.stdout)
    assert [r["role"] for r in export["receipts"]] == ["server", "server"]
    check = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-c", THIRD_PARTY], input=out.stdout, capture_output=True, text=True, timeout=60))
    assert check.returncode == 0 and check.stdout.strip() == "2", check.stderr
    # A tampered export fails the check: one verdict changed in the signed body.
    body = base64.b64decode(export["receipts"][0]["body"])
    i = body.index(b"\xa8verified") + 9
    forged = body[:i] + bytes([body[i] + 1]) + body[i + 1:]
    export["receipts"][0]["raw"] = base64.b64encode(
        base64.b64decode(export["receipts"][0]["raw"]).replace(body, forged)).decode()
    export["receipts"][0]["body"] = base64.b64encode(forged).decode()
    export["receipts"][0]["fields"]["verified"] += 1
    bad = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-c", THIRD_PARTY], input=json.dumps(export), capture_output=True, text=True,
        timeout=60))
    assert bad.returncode != 0 and "InvalidSignature" in bad.stderr

    # The owner report (no node runs: from the stored ledger) gains the credits.
    report = await trio.to_thread.run_sync(owner_cli, "report", "--json", "--data-dir", str(data_dir))
    assert report.returncode == 0, report.stderr
    credits = json.loads(report.stdout)["credits"]
    assert credits["receipts"] == 2 and credits["tokens"] == 6 and credits["block_steps"] == 12
    assert credits["tokens_unverified"] == 6 and credits["verified"] == 0.0
    assert credits["unverified"] == pytest.approx(SMOL_FLOPS * 12 / CREDIT_FLOPS)


async def test_a_close_cut_short_by_its_caller_still_frees_the_servers_session(
        tmp_path: Path, served_stage: Stage, split_model: ClientModel) -> None:
    """A close whose receipt exchange is cut short (the caller's deadline) still ends the stream: a
    stream left open would hold the session, and this client's share of the server, until the
    server's idle timeout."""
    async with served(served_stage, tmp_path) as (server, stage_server, client):
        fleet = direct_client(server, client, split_model)
        pipeline = Pipeline(fleet, 16)
        await pipeline.open()
        x = np.random.default_rng(0).standard_normal((4, 576)).astype(np.float32)
        await pipeline.forward(x, 0)
        assert stage_server.active_sessions == 1
        with trio.move_on_after(0.001):
            await pipeline.hops[0].close()
        with trio.fail_after(5):  # far below the 60 s idle timeout
            while stage_server.active_sessions:
                await trio.sleep(0.05)
