"""The owner's side of a node (node/owner/control.py, node/cli/owner.py): data directory, signed consent
log, vehicle "unknown", control socket, report, and the stage server's policy gate."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.cli.main import main
from idlefleet.node.config import NodeConfig
from idlefleet.node.model.stage import Stage
from idlefleet.node.owner.control import (
    ConsentLog,
    ConsentLogError,
    DataDir,
    control_request,
    grant_expiry,
    owner_report,
    serve_control,
    vehicle_reading,
)
from idlefleet.node.runtime.node import open_node
from idlefleet.node.serve.server import ServerConfig, StageServer
from idlefleet.node.vehicle.sources import JsonFileVehicle
from idlefleet.p2p.errors import RemoteError
from idlefleet.p2p.host import HostConfig, open_host
from idlefleet.protocols import session as S
from idlefleet.protocols.errors import ConfigError
from idlefleet.protocols.policy import Consent, Decision, Preferences, decide
from idlefleet.protocols.reports import Accusations
from idlefleet.protocols.serving import Serving, serving_decision
from idlefleet.protocols.tensors import encode_hidden
from tests.test_stage_server import MAX_LEN, hidden, open_session, step, two_blocks  # noqa: F401

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PARKED = {"battery_soc": 0.8, "plugged_in": True, "charging_kw": 7.0, "thermal_headroom_c": 40.0,
          "parked": True, "parked_since": 1.0, "expected_departure": None}


# -- data directory --------------------------------------------------------------------------------

def test_data_dir_is_created_owner_only_and_others_writable_dirs_are_refused(tmp_path: Path) -> None:
    d = DataDir.open(tmp_path / "home" / "node")
    assert d.path.stat().st_mode & 0o777 == 0o700
    assert (d.key_file.name, d.consent_log.name, d.events.name, d.socket.name) == (
        "node.key", "consent.jsonl", "events.jsonl", "control.sock")
    os.chmod(d.path, 0o777)
    with pytest.raises(ConfigError, match="writable by other users"):
        DataDir.open(d.path)
    os.chmod(d.path, 0o750)  # readable by the group is fine, writable is not
    assert DataDir.open(d.path).path == d.path
    with pytest.raises(ConfigError, match="does not exist"):
        DataDir.open(tmp_path / "missing", create=False)
    (tmp_path / "link").symlink_to(d.path)
    with pytest.raises(ConfigError, match="symbolic link"):
        DataDir.open(tmp_path / "link")


def test_node_config_puts_key_and_events_in_the_data_dir(tmp_path: Path) -> None:
    config = NodeConfig(data_dir=tmp_path)
    assert config.key_path == tmp_path / "node.key"
    assert config.events_path == tmp_path / "events.jsonl"
    assert NodeConfig().events_path is None  # embedded use without a data dir: no event log
    assert NodeConfig(data_dir=tmp_path, key_file=tmp_path / "other.key").key_path == tmp_path / "other.key"
    with pytest.raises(ConfigError, match="owner preferences"):
        NodeConfig(owner={"min_battery_pct": 150})


# -- consent log -----------------------------------------------------------------------------------

def test_consent_log_grant_revoke_and_reload(tmp_path: Path) -> None:
    log = ConsentLog(tmp_path / "consent.jsonl", KEY)
    assert log.consent() == Consent()
    log.append("grant", 100.0, by="test", expires=200.0)
    assert log.consent() == Consent(100.0, 200.0, None)
    log.append("revoke", 150.0, by="test")
    again = ConsentLog(tmp_path / "consent.jsonl", KEY)  # what a restarted node reads
    assert again.consent() == Consent(100.0, 200.0, 150.0)
    assert [e["op"] for e in again.entries()] == ["grant", "revoke"]
    assert (tmp_path / "consent.jsonl").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("tamper", ["edit", "reorder", "drop_first", "other_key"])
def test_consent_log_detects_tampering(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "consent.jsonl"
    log = ConsentLog(path, KEY)
    log.append("grant", 100.0, by="test")
    log.append("revoke", 150.0, by="test")
    lines = path.read_bytes().splitlines(keepends=True)
    if tamper == "edit":  # pretend the revocation came later
        path.write_bytes(lines[0] + lines[1].replace(b'"t":150.0', b'"t":999.0'))
    elif tamper == "reorder":
        path.write_bytes(lines[1] + lines[0])
    elif tamper == "drop_first":
        path.write_bytes(lines[1])
    else:
        ConsentLog(tmp_path / "forged.jsonl", Ed25519PrivateKey.generate()).append("grant", 1.0, by="x")
        path.write_bytes((tmp_path / "forged.jsonl").read_bytes())
    with pytest.raises(ConsentLogError, match=r"line [12]"):
        log.entries()
    with pytest.raises(ConsentLogError):  # never extended while it does not verify
        log.append("grant", 200.0, by="test")


def test_consent_log_survives_a_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "consent.jsonl"
    log = ConsentLog(path, KEY)
    log.append("grant", 100.0, by="test")
    with open(path, "ab") as f:
        f.write(b'{"op": "rev')  # a crash mid-write
    assert log.consent() == Consent(100.0, None, None)
    log.append("revoke", 120.0, by="test")
    assert log.consent() == Consent(100.0, None, 120.0)


def test_grant_expiry() -> None:
    assert grant_expiry(1000.0, 2, None) == 1000.0 + 7200
    assert grant_expiry(1000.0, None, None) is None
    assert grant_expiry(1000.0, None, 5000) == 5000.0
    t = time.time()
    tomorrow = datetime.fromtimestamp(int(t) + 86_400, tz=UTC).isoformat()
    assert grant_expiry(t, None, tomorrow) == int(t) + 86_400
    with pytest.raises(ConfigError, match="within a year"):
        grant_expiry(t, None, "2099-01-01T00:00:00+00:00")
    for hours, until, match in ((0, None, "--hours"), (float("nan"), None, "--hours"),
                                (1, "2099-01-01", "not both"), (None, "tomorrow", "ISO 8601"),
                                (None, "2001-01-01T00:00", "future")):
        with pytest.raises(ConfigError, match=match):
            grant_expiry(t, hours, until)


# -- vehicle "unknown" -----------------------------------------------------------------------------

def test_missing_invalid_or_stale_vehicle_file_is_unknown_and_does_not_serve(tmp_path: Path) -> None:
    path = tmp_path / "vehicle.json"
    provider = JsonFileVehicle(path)
    prefs, consent = Preferences(max_state_age_s=30), Consent(granted_at=0.0)
    path.write_text(json.dumps(PARKED))
    mtime = path.stat().st_mtime
    state = provider.read(mtime + 1)
    reading = vehicle_reading(provider, state, mtime + 1, link_metered=False)
    assert reading is not None and reading.observed_at == mtime
    assert decide(prefs, consent, reading, mtime + 1).action == "serve"
    # The daemon died: the file is not rewritten; 30 s later the state is unknown.
    stale = vehicle_reading(provider, provider.read(mtime + 31), mtime + 31, link_metered=False)
    assert decide(prefs, consent, stale, mtime + 31).reason == "vehicle_unknown"
    # An invalid file (NaN): the last good state is not trusted.
    path.write_text(json.dumps(PARKED).replace("0.8", "NaN"))
    state = provider.read(mtime + 2)
    assert provider.last_error is not None
    assert vehicle_reading(provider, state, mtime + 2, link_metered=False) is None
    # A missing file: unknown as well.
    path.unlink()
    assert vehicle_reading(provider, provider.read(mtime + 3), mtime + 3, link_metered=False) is None
    assert decide(prefs, consent, None, mtime + 3).action == "stop"
    # A fresh file: known again (the policy's cool-down then applies).
    path.write_text(json.dumps(PARKED))
    now = path.stat().st_mtime
    assert vehicle_reading(provider, provider.read(now), now, link_metered=False) is not None


# -- control socket --------------------------------------------------------------------------------

async def test_control_socket_round_trip_permissions_and_bad_requests(tmp_path: Path) -> None:
    sock = tmp_path / "control.sock"
    seen: list[dict[str, Any]] = []

    def handler(request: dict[str, Any]) -> dict[str, Any]:
        seen.append(request)
        if request["op"] == "boom":
            raise ValueError("no such thing")
        return {"ok": True, "echo": request["op"]}

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, sock, handler)
        assert sock.stat().st_mode & 0o777 == 0o600
        assert await trio.to_thread.run_sync(control_request, sock, {"op": "status"}) == {
            "ok": True, "echo": "status"}
        assert await trio.to_thread.run_sync(control_request, sock, {"op": "boom"}) == {
            "ok": False, "error": "no such thing"}
        assert (await trio.to_thread.run_sync(control_request, sock, {"nop": 1}))["ok"] is False
        with pytest.raises(ConfigError, match="already runs"):
            await serve_control(sock, handler)
        os.chmod(sock, 0o666)
        with pytest.raises(ConfigError, match="writable by other users"):
            await trio.to_thread.run_sync(control_request, sock, {"op": "status"})
        nursery.cancel_scope.cancel()
    assert [r["op"] for r in seen] == ["status", "boom"]
    assert not sock.exists()  # removed on exit
    assert control_request(sock, {"op": "status"}) is None  # no node runs


# -- owner report ----------------------------------------------------------------------------------

def test_owner_report_from_the_event_log(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    lines = [
        {"t": 10, "event": "policy", "action": "serve", "reason": "ok", "detail": ""},
        {"t": 11, "event": "published", "battery_soc": 0.80},
        {"t": 12, "event": "session_opened", "session": 1, "blocks": [0, 10]},
        {"t": 13, "event": "session_closed", "session": 1, "tokens": 20, "steps": 16,
         "busy_s": 1.8, "blocks": [0, 10]},
        {"t": 14, "event": "published", "battery_soc": 0.79},
        {"t": 15, "event": "published", "battery_soc": 0.81},  # charging: not "used"
        {"t": 16, "event": "session_opened", "session": 2, "blocks": [5, 8]},
        {"t": 17, "event": "session_closed", "session": 2, "tokens": 4, "busy_s": 1.8, "blocks": [5, 8]},
        {"t": 18, "event": "policy", "action": "drain", "reason": "consent_revoked", "detail": "x"},
        {"t": 19, "event": "published", "battery_soc": 0.78},
    ]
    events.write_text("".join(json.dumps(e) + "\n" for e in lines) + "garbage\n")
    r = owner_report(events, power_w=100.0)
    assert (r["sessions"], r["tokens"], r["block_steps"]) == (2, 24, 20 * 10 + 4 * 3)
    assert r["busy_s"] == 3.6 and r["energy_wh"] == 0.1
    assert r["battery_used_pct"] == pytest.approx(4.0)
    assert [(t["action"], t["reason"]) for t in r["transitions"]] == [("serve", "ok"),
                                                                      ("drain", "consent_revoked")]
    later = owner_report(events, since=16)
    assert (later["sessions"], later["tokens"], len(later["transitions"])) == (1, 4, 1)


# -- the owner CLI on stored state (no node running) -----------------------------------------------

def test_owner_cli_without_a_running_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "car"
    assert main(["owner", "status", "--data-dir", str(d)]) == 2  # no such data dir yet
    assert "does not exist" in capsys.readouterr().err
    assert main(["owner", "consent", "--hours", "2", "--data-dir", str(d)]) == 0
    capsys.readouterr()
    assert main(["owner", "status", "--json", "--data-dir", str(d)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["running"] is False and status["consent"]["active"] is True
    assert status["consent"]["expires_at"] == pytest.approx(time.time() + 7200, abs=60)
    assert main(["owner", "revoke", "--data-dir", str(d)]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["owner", "report", "--json", "--data-dir", str(d)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"sessions", "tokens", "block_steps", "busy_s", "energy_wh", "transitions"} <= set(report)
    assert main(["owner", "consent", "--hours", "-1", "--data-dir", str(d)]) == 2
    # The log is signed with the node's own key, created in the data dir.
    assert (d / "node.key").exists() and len((d / "consent.jsonl").read_text().splitlines()) == 2


# -- a running node: revocation over the control socket takes effect within a second ---------------

async def test_running_node_revocation_drains_then_stops_within_a_second(tmp_path: Path) -> None:
    vehicle = tmp_path / "vehicle.json"
    vehicle.write_text(json.dumps(PARKED))
    config = NodeConfig(data_dir=tmp_path / "car", vehicle=f"file:{vehicle}", consent=True, serve=False)
    async with open_node(config) as node:
        sock = tmp_path / "car" / "control.sock"
        status = await trio.to_thread.run_sync(control_request, sock, {"op": "status"})
        assert status is not None and status["decision"]["action"] == "serve"
        record = node.view.get(node.peer_id)
        assert record is not None and record.record.policy == "serve" and record.record.consent
        started = trio.current_time()
        reply = await trio.to_thread.run_sync(control_request, sock, {"op": "revoke"})
        assert reply is not None and reply["decision"]["action"] == "drain"
        assert reply["decision"]["reason"] == "consent_revoked"
        with trio.fail_after(3):
            while node.owner.decision is None or node.owner.decision.action != "stop":
                await trio.sleep(0.05)
        assert trio.current_time() - started < 2.5  # drain 1 s, then stop at the next poll
        with trio.fail_after(3):
            while (entry := node.view.get(node.peer_id)) is None or entry.record.policy != "stop":
                await trio.sleep(0.05)
        assert entry.record.policy_reason == "consent_revoked" and entry.record.consent is False
        # Consent again: serving resumes at once (an owner's choice has no cool-down).
        reply = await trio.to_thread.run_sync(control_request, sock, {"op": "consent", "hours": 1})
        assert reply is not None and reply["decision"]["action"] == "serve"
    events = [json.loads(line) for line in (tmp_path / "car" / "events.jsonl").read_text().splitlines()]
    transitions = [(e["action"], e["reason"]) for e in events if e["event"] == "policy"]
    assert transitions == [("serve", "ok"), ("drain", "consent_revoked"), ("stop", "consent_revoked"),
                           ("serve", "ok")]
    assert [e["op"] for e in ConsentLog(tmp_path / "car" / "consent.jsonl",
                                        _key(tmp_path / "car")).entries()] == ["grant", "revoke", "grant"]


def _key(data_dir: Path) -> Ed25519PrivateKey:
    from idlefleet.p2p.identity import load_key_file

    return load_key_file(data_dir / "node.key")


async def test_node_with_an_unknown_vehicle_does_not_serve(tmp_path: Path) -> None:
    config = NodeConfig(data_dir=tmp_path / "car", vehicle=f"file:{tmp_path / 'none.json'}",
                        consent=True, serve=False)
    async with open_node(config) as node:
        assert node.owner.decision is not None
        assert (node.owner.decision.action, node.owner.decision.reason) == ("stop", "vehicle_unknown")


# -- the stage server's gate -----------------------------------------------------------------------

def policy_gate(why: str | None) -> Serving:
    """A running node's gate whose owner policy serves (``why`` None) or stops for ``why``."""
    decision = Decision("serve", "ok", 0.0) if why is None else Decision("stop", why, 0.0)
    return serving_decision("running", decision, "ready")


async def test_server_gate_refuses_flags_and_stops_sessions(two_blocks: Stage) -> None:  # noqa: F811
    why: list[str | None] = [None]
    server = StageServer(two_blocks, ServerConfig(), gate=lambda: policy_gate(why[0]))
    async with (
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as host,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as client,
    ):
        host.set_stream_handler(S.STAGE_PROTOCOL, server.handle)
        peer = await client.connect(host.multiaddrs()[0])
        fs = await open_session(client, peer, two_blocks)
        await step(fs, hidden(3), 0)
        why[0] = "driving"  # the owner policy says no
        with pytest.raises(RemoteError, match="owner policy: driving"):
            await open_session(client, peer, two_blocks)
        assert server.stats.sessions_refused == {S.ERR_DRAINING: 1}
        await fs.send("step", S.Step(3, encode_hidden(hidden(1))).to_body(), timeout=5)
        reply = await fs.receive_reply(timeout=10)
        assert S.StepResult.from_body(reply.body).draining is True
        assert server.stop_sessions() == 1
        with pytest.raises(RemoteError) as err:
            await fs.receive_reply(timeout=5)
        assert err.value.code == S.ERR_DRAINING and "owner policy" in str(err.value)
        with trio.fail_after(5):
            await server.wait_idle()
        assert server.active_sessions == 0


async def test_refusal_names_the_policy_reason(two_blocks: Stage) -> None:  # noqa: F811
    server = StageServer(two_blocks, ServerConfig(), gate=lambda: policy_gate("battery_floor"))
    async with (
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as host,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as client,
    ):
        host.set_stream_handler(S.STAGE_PROTOCOL, server.handle)
        peer = await client.connect(host.multiaddrs()[0])
        fs = await client.open_stream(peer, S.STAGE_PROTOCOL)
        body = S.OpenRequest(two_blocks.model_id, two_blocks.start, two_blocks.end, MAX_LEN).to_body()
        await fs.send("session_open", body, timeout=5)
        with pytest.raises(RemoteError) as err:
            await fs.receive_reply(timeout=5)
        assert err.value.code == S.ERR_DRAINING and "battery_floor" in str(err.value)


# -- routing: policy and regions -------------------------------------------------------------------

class RoutingStandIn:
    """What FleetClient's routing reads of a node: its view, RTTs, peer id and region."""

    def __init__(self, records: list[Any]) -> None:
        self.records = records
        self.peer_id = "12D3KooWClient"
        self.config = NodeConfig(region="u33d")
        self.liveness = type("L", (), {"min_rtt_s": {}})()
        self.accusations = Accusations()  # nobody accused

    hosting = None  # a client only: hosts nothing itself

    def fleet(self) -> list[Any]:
        return self.records

    def routable(self) -> list[Any]:
        return self.records


def test_routing_skips_peers_whose_policy_says_no_and_honours_allowed_regions(client_model: Any) -> None:
    from idlefleet.node.client.config import ClientConfig
    from idlefleet.node.client.fleet import FleetClient
    from idlefleet.protocols.routing import NoRoute
    from tests.factories import T0, capacity_record

    def rec(region: str, **kw: Any) -> Any:
        return capacity_record(Ed25519PrivateKey.generate(), region=region, model_id=client_model.model_id,
                               blocks=(0, client_model.n_blocks), issued_at=time.time(), **kw)

    near, stopped, far = rec("u33d"), rec("u33d", policy="stop", policy_reason="driving"), rec("u28x")
    assert time.time() > T0
    node = RoutingStandIn([near, stopped, far])
    client = FleetClient(node, client_model, ClientConfig())  # type: ignore[arg-type]
    assert {c.peer_id for c in client.candidates()} == {near.peer_id, far.peer_id}
    only_u28 = FleetClient(node, client_model, ClientConfig(allow_regions=("u28",)))  # type: ignore[arg-type]
    assert [h.peer_id for h in only_u28.find_route()] == [far.peer_id]
    node.records = [near, stopped]
    with pytest.raises(NoRoute, match="no route within the allowed regions u28"):
        only_u28.find_route()
