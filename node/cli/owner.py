"""``idlefleet owner consent|revoke|status|report|receipts``: the owner's controls and view of a node.

Each command talks to the running node through ``DATA_DIR/control.sock``; when no node runs it
works on the stored state (the consent log, the event log and the ledger in the data directory).
``receipts`` always reads the ledger file itself (SQLite lets it read while the node writes).
Exit codes: 0 ok, 2 bad usage or a refused data directory / socket.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from idlefleet.node.owner.control import (
    ConsentLog,
    DataDir,
    control_request,
    credits_report,
    default_data_dir,
    grant_expiry,
    owner_report,
    read_events,
)
from idlefleet.protocols import wire
from idlefleet.protocols.errors import ConfigError, RemoteProtocolError
from idlefleet.protocols.receipts import credits, decode_receipt


def add_owner_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("owner", help="the owner's controls: consent, revoke, status, report, receipts")
    cmds = p.add_subparsers(dest="owner_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data-dir", type=Path, default=None,
                       help="the node's data directory (default ~/.idlefleet or $IDLEFLEET_HOME)")

    q = cmds.add_parser("consent", help="consent to serving inference (until revoked, or for a while)")
    when = q.add_mutually_exclusive_group()
    when.add_argument("--hours", type=float, help="consent for this many hours from now")
    when.add_argument("--until", metavar="TIME", help="consent until TIME (ISO 8601, local time)")
    common(q)
    q = cmds.add_parser("revoke", help="withdraw consent now: sessions move away, then serving stops")
    common(q)
    q = cmds.add_parser("status", help="consent, the serving decision and its reason")
    q.add_argument("--json", action="store_true")
    common(q)
    q = cmds.add_parser("report", help="what the node did: sessions, tokens, energy, transitions")
    q.add_argument("--since", metavar="TIME", help="unix time or ISO 8601 (default: everything)")
    q.add_argument("--json", action="store_true")
    q.add_argument("--power-w", type=float, default=100.0,
                   help="compute power draw for the energy estimate when no node runs (default 100)")
    common(q)
    q = cmds.add_parser("receipts", help="export the signed work receipts of the ledger (--json: for "
                        "a third party to check every signature)")
    q.add_argument("--since", metavar="TIME", help="receipts closed at/after TIME: unix time or ISO 8601")
    q.add_argument("--role", choices=("server", "client"),
                   help="only work this node did (server) or asked for (client)")
    q.add_argument("--json", action="store_true")
    common(q)


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ConfigError(f"--since {text!r} is not a unix time or an ISO 8601 time") from None


def _consent_log(data_dir: DataDir) -> ConsentLog:
    from idlefleet.p2p.identity import load_or_create_key  # the node's own key signs the log

    key, _ = load_or_create_key(data_dir.key_file)
    return ConsentLog(data_dir.consent_log, key)


def run_owner(args: argparse.Namespace) -> int:
    """Entry point; returns the exit code. Raises ConfigError (printed by the CLI) on refusal."""
    path = args.data_dir if args.data_dir is not None else default_data_dir()
    cmd = args.owner_command
    data_dir = DataDir.open(path, create=cmd == "consent")
    if cmd == "receipts":
        export = export_receipts(data_dir.ledger, since=_since(args.since), role=args.role)
        _print_receipts(export, args.json)
        return 0
    request: dict[str, Any] = {"op": cmd}
    if cmd == "consent":
        request.update(hours=args.hours, until=args.until)
        grant_expiry(time.time(), args.hours, args.until)  # bad usage fails here, before the node
    elif cmd == "report":
        request["since"] = _since(args.since)
    reply = control_request(data_dir.socket, request)
    if reply is not None and not reply.get("ok"):
        raise ConfigError(f"the node refused: {reply.get('error')}")
    if reply is None:
        reply = _offline(data_dir, args, request)
    _print(cmd, reply, getattr(args, "json", False))
    return 0


def _offline(data_dir: DataDir, args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    """No node runs: act on the stored state."""
    now = time.time()
    cmd = request["op"]
    if cmd in ("consent", "revoke"):
        log = _consent_log(data_dir)
        if cmd == "consent":
            entry = log.append("grant", now, by="owner consent",
                               expires=grant_expiry(now, args.hours, args.until))
        else:
            entry = log.append("revoke", now, by="owner revoke")
        return {"ok": True, "entry": entry, **_offline_status(data_dir, now)}
    if cmd == "status":
        return {"ok": True, **_offline_status(data_dir, now)}
    report = owner_report(data_dir.events, since=request.get("since"), power_w=args.power_w)
    report["credits"] = credits_report(data_dir.ledger, since=request.get("since"))
    return {"ok": True, "report": report}


def export_receipts(ledger: Path, *, since: float | None = None, role: str | None = None) -> dict[str, Any]:
    """Every stored receipt (closed at/after ``since``) for a third party: ``raw`` is the
    double-signed receipt (PROTOCOL.md 7.3) in base64, ``body`` the signed bytes in base64,
    ``server_sig`` / ``client_sig`` hex, then the decoded fields and credits. Each is re-verified
    here; a row that does not verify (a tampered file) raises ConfigError."""
    from idlefleet.node.owner.ledger import Ledger

    out: dict[str, Any] = {"ledger": str(ledger), "receipts": [], "refused": []}
    if not ledger.exists():
        return out
    with Ledger(ledger) as opened:
        rows = opened.receipts(since=since, role=role)
        refused = opened.refused(since=since) if role in (None, "client") else []
    for row_role, raw in rows:
        try:
            receipt = decode_receipt(raw)
        except RemoteProtocolError as e:
            raise ConfigError(f"{ledger}: a stored receipt does not verify: {e}") from None
        outer = wire.unpack(raw, what="receipt")
        out["receipts"].append({
            "role": row_role, "raw": base64.b64encode(raw).decode(),
            "body": base64.b64encode(outer["body"]).decode(),
            "server_sig": outer["server_sig"].hex(), "client_sig": outer["client_sig"].hex(),
            "fields": receipt.to_dict(), "credits": credits(receipt)})
    out["refused"] = refused
    return out


def _print_receipts(export: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(export))
        return
    receipts = export["receipts"]
    print(f"{len(receipts)} receipt(s) in {export['ledger']}")
    for r in receipts:
        f = r["fields"]
        print(f"  {_when(f['closed_at'])}  {r['role']:<6} server ..{f['server'][-8:]} "
              f"client ..{f['client'][-8:]}"
              f"  blocks {f['start']}-{f['end']}  tokens {f['tokens']} (verified {f['verified']}, "
              f"unverified {f['unverified']}, rejected {f['rejected']})  "
              f"{r['credits']['verified']:.6f} credits")
    for x in export["refused"]:
        print(f"  {_when(x['at'])}  refused by ..{x['peer'][-8:]} (session {x['session']}): {x['reason']}")


def _offline_status(data_dir: DataDir, now: float) -> dict[str, Any]:
    consent = _consent_log(data_dir).consent() if data_dir.consent_log.exists() else None
    last = None
    for e in read_events(data_dir.events):
        if e.get("event") == "policy":
            last = {"action": e.get("action"), "reason": e.get("reason"), "since": e["t"],
                    "detail": e.get("detail", "")}
    return {
        "running": False, "data_dir": str(data_dir.path),
        "consent": None if consent is None else {
            "active": consent.active(now), "granted_at": consent.granted_at,
            "expires_at": consent.expires_at, "revoked_at": consent.revoked_at,
            "scope": list(consent.scope)},
        "decision": None, "last_decision": last,
    }


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t).isoformat(timespec="seconds")


def _print(cmd: str, reply: dict[str, Any], as_json: bool) -> None:
    reply = {k: v for k, v in reply.items() if k != "ok"}
    if as_json:
        print(json.dumps(reply.get("report", reply)))
        return
    if cmd == "report":
        r = reply["report"]
        print(f"since {_when(r['since'])} until {_when(r['until'])}")
        print(f"sessions {r['sessions']}  tokens {r['tokens']}  block-steps {r['block_steps']}")
        print(f"busy {r['busy_s']:.1f}s  energy {r['energy_wh']:.3f} Wh (at {r['power_w']:g} W)  "
              f"battery used {r['battery_used_pct']:.2f}%")
        c = r.get("credits")
        if c is not None:
            print(f"credits {c['verified']:.6f} verified, {c['unverified']:.6f} unverified, "
                  f"{c['rejected']:.6f} rejected  ({c['receipts']} receipts, tokens {c['tokens_verified']} "
                  f"verified / {c['tokens_unverified']} unverified / {c['tokens_rejected']} rejected)")
        for t in r["transitions"]:
            detail = f" ({t['detail']})" if t.get("detail") else ""
            print(f"  {_when(t['t'])}  {t['action']:<5} {t['reason']}{detail}")
        return
    consent = reply.get("consent")
    if consent is None:
        print("consent: never given")
    elif consent["active"]:
        until = "until revoked" if consent["expires_at"] is None else f"until {_when(consent['expires_at'])}"
        print(f"consent: given {_when(consent['granted_at'])}, {until}")
    elif consent["revoked_at"] is not None:
        print(f"consent: revoked {_when(consent['revoked_at'])}")
    elif consent["granted_at"] is None:
        print("consent: never given")
    else:
        print(f"consent: expired {_when(consent['expires_at'])}")
    d = reply.get("decision")
    if reply.get("running"):
        print(f"node: running ({reply.get('state')}), blocks {reply.get('blocks')}, "
              f"{reply.get('sessions', 0)} session(s)")
        if d is not None:
            print(f"decision: {d['action']} ({d['reason']}{': ' + d['detail'] if d.get('detail') else ''})"
                  f" since {_when(d['since'])}")
    else:
        last = reply.get("last_decision")
        print("node: not running" + (f"; last decision {last['action']} ({last['reason']})" if last else ""))

