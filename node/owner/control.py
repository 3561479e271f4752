"""The owner's side of a node: data directory, signed consent log, the serving decision, the control
socket and the owner report.

Data directory (``idlefleet node --data-dir DIR``, default ``~/.idlefleet``; owner-only, 0700)::

    node.key          the node's Ed25519 identity (0600)
    consent.jsonl     signed, hash-chained, append-only consent log (0600)
    events.jsonl      the event log: sessions, tokens, policy transitions (the owner report's source)
    ledger.sqlite     signed work receipts, as server and as client (node.ledger; the credits)
    control.sock      Unix socket for ``idlefleet owner ...`` while the node runs (0600)
    vehicle.json      (``swarm --vehicle file``) the vehicle state file the node reads

A consent log line is a JSON object ``{"op": "grant"|"revoke", "t", "start", "expires", "scope",
"by", "prev", "sig"}``: ``prev`` is the SHA-256 (hex) of the previous line's bytes ("" for the
first), ``sig`` the Ed25519 signature (hex) by the node's key over ``CONSENT_DOMAIN`` + the line's
JSON without ``sig`` (keys sorted, no spaces). Reading verifies every line and the chain, so an
edited, reordered or truncated-in-the-middle log is detected (``ConsentLogError``).

``OwnerControl`` is the one component that decides whether the node may serve now: it folds the
consent log, reads the preferences and the vehicle, calls ``protocols.policy.decide`` and keeps
the resulting ``Decision`` (``decision``), logging every transition with its reason. Everything
else (stage server, hosting, the published record) reads that decision.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.owner.ledger import LEDGER_FILE, Ledger
from idlefleet.protocols.errors import ConfigError, IdlefleetError
from idlefleet.protocols.policy import (
    SCOPE_INFERENCE,
    Consent,
    Decision,
    Preferences,
    VehicleReading,
    consent_from_entries,
    decide,
)

log = logging.getLogger(__name__)

CONSENT_DOMAIN = b"idlefleet/consent-log/v1\x00"
MAX_CONTROL_BYTES = 64 * 1024
CONTROL_TIMEOUT_S = 2.0
MAX_CONSENT_HOURS = 24 * 366


class ConsentLogError(IdlefleetError):
    """The consent log is unreadable, forged or broken; the message says which line and why."""


# --------------------------------------------------------------------------------------------------
# Data directory


def default_data_dir() -> Path:
    return Path(os.environ.get("IDLEFLEET_HOME", "~/.idlefleet")).expanduser()


def check_private(path: Path, what: str) -> None:
    """Refuse ``path`` unless it is ours and nobody else can write it. Raises ConfigError."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{what} {path} is a symbolic link; refusing it")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{what} {path} belongs to uid {st.st_uid}, not to us ({os.getuid()})")
    if st.st_mode & 0o022:
        raise ConfigError(f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                          f"run: chmod go-w {path}")


@dataclass(frozen=True)
class DataDir:
    """The paths of one node's data directory. ``open`` creates and checks it."""

    path: Path

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> DataDir:
        """Create (0700) if missing and ``create``; refuse one that others can write. ConfigError."""
        path = path.expanduser()
        if create:
            try:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot create data directory {path}: {e.strerror or e}") from None
        elif not path.is_dir():
            raise ConfigError(f"data directory {path} does not exist (start a node with --data-dir first, "
                              "or use owner consent to create it)")
        check_private(path, "data directory")
        return cls(path)

    @property
    def key_file(self) -> Path:
        return self.path / "node.key"

    @property
    def consent_log(self) -> Path:
        return self.path / "consent.jsonl"

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def socket(self) -> Path:
        return self.path / "control.sock"

    @property
    def vehicle(self) -> Path:
        return self.path / "vehicle.json"

    @property
    def ledger(self) -> Path:
        return self.path / LEDGER_FILE

    @property
    def trust(self) -> Path:
        """The client's trust book (how often each peer's work is checked), kept across runs."""
        return self.path / "trust.json"


# --------------------------------------------------------------------------------------------------
# Consent log


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


class ConsentLog:
    """The signed, hash-chained, append-only consent log at ``path``, signed by ``key``."""

    def __init__(self, path: Path, key: Ed25519PrivateKey) -> None:
        self.path = path
        self._key = key
        self._public = key.public_key()

    def _lines(self) -> list[bytes]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise ConsentLogError(f"cannot read {self.path}: {e.strerror or e}") from None
        lines = data.split(b"\n")
        if lines and lines[-1]:
            log.warning("%s: ignoring a half-written last line", self.path)
        return [line for line in lines[:-1] if line]

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first, each verified. Raises ConsentLogError on any bad line."""
        out: list[dict[str, Any]] = []
        prev = ""
        for n, line in enumerate(self._lines(), 1):
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
                sig = bytes.fromhex(entry.pop("sig"))
                self._public.verify(sig, CONSENT_DOMAIN + _canonical(entry))
            except (ValueError, KeyError, TypeError, AttributeError, InvalidSignature):
                raise ConsentLogError(f"{self.path} line {n}: not a valid signed entry") from None
            if entry.get("prev") != prev:
                raise ConsentLogError(f"{self.path} line {n}: hash chain broken (edited or reordered)")
            if entry.get("op") not in ("grant", "revoke"):
                raise ConsentLogError(f"{self.path} line {n}: unknown op {entry.get('op')!r}")
            prev = hashlib.sha256(line).hexdigest()
            out.append(entry)
        return out

    def consent(self) -> Consent:
        return consent_from_entries(self.entries())

    def append(self, op: str, now: float, *, by: str, start: float | None = None,
               expires: float | None = None, scope: tuple[str, ...] = (SCOPE_INFERENCE,)) -> dict[str, Any]:
        """Sign and append one entry (under an exclusive lock). Returns it. ConsentLogError."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            lines = self._lines()
            self.entries()  # never extend a log that does not verify
            entry: dict[str, Any] = {"op": op, "t": now, "by": by,
                                     "prev": hashlib.sha256(lines[-1]).hexdigest() if lines else ""}
            if op == "grant":
                entry.update(start=now if start is None else start, expires=expires, scope=list(scope))
            entry["sig"] = self._key.sign(CONSENT_DOMAIN + _canonical(entry)).hex()
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # drop a half-written line (a crash mid-write)
                f.truncate(data.rfind(b"\n") + 1)
            f.write(_canonical(entry) + b"\n")
        return entry


def grant_expiry(now: float, hours: float | None, until: str | float | None) -> float | None:
    """When a grant given at ``now`` ends: ``hours`` from now, ``until`` (unix time or ISO 8601,
    local time unless it has an offset), or None (until revoked). Raises ConfigError."""
    if hours is not None and until is not None:
        raise ConfigError("give --hours or --until, not both")
    if hours is not None:
        if isinstance(hours, bool) or not isinstance(hours, int | float) or not (
                math.isfinite(hours) and 0 < hours <= MAX_CONSENT_HOURS):
            raise ConfigError(f"--hours must be in (0, {MAX_CONSENT_HOURS}], got {hours!r}")
        return now + hours * 3600
    if until is None:
        return None
    if isinstance(until, int | float) and not isinstance(until, bool):
        end = float(until)
    else:
        try:
            end = datetime.fromisoformat(str(until)).timestamp()
        except ValueError:
            raise ConfigError(f"--until {until!r} is not a time like 2026-12-02T07:00 "
                              "(ISO 8601, local time unless it has an offset)") from None
    if not (math.isfinite(end) and now < end <= now + MAX_CONSENT_HOURS * 3600):
        raise ConfigError(f"--until {until!r} must be in the future (within a year)")
    return end


# --------------------------------------------------------------------------------------------------
# The decision


def vehicle_reading(provider: Any, state: Any, now: float, *, link_metered: bool) -> VehicleReading | None:
    """What the policy sees of ``provider``'s latest ``state`` (None: unknown).

    Unknown: no state; or a file source whose latest version is missing or invalid (its last good
    state is not trusted: the daemon may be writing garbage because it is failing). A file
    source's state is as old as the file's mtime (a dead daemon's file grows stale); other
    providers measure at ``now``.
    """
    if state is None:
        return None
    observed = now
    if hasattr(provider, "changed_at"):  # JsonFileVehicle
        if provider.last_error is not None or provider.changed_at is None:
            return None
        observed = min(now, provider.changed_at)
    return VehicleReading(battery_soc=state.battery_soc, plugged_in=state.plugged_in,
                          thermal_headroom_c=state.thermal_headroom_c, parked=state.parked,
                          expected_departure=state.expected_departure, observed_at=observed,
                          link_metered=link_metered)


class OwnerControl:
    """Owns "may this node serve now". Consent comes from ``log`` (or, without a data directory,
    from memory); ``evaluate`` computes the decision; ``on_change`` is called after every grant
    or revocation so the node re-evaluates at once."""

    def __init__(self, prefs: Preferences, log_: ConsentLog | None, *,
                 event: Callable[..., None], on_change: Callable[[], None] = lambda: None) -> None:
        self.prefs = prefs
        self.log = log_
        self._memory: list[dict[str, Any]] = []
        self._event = event
        self.on_change = on_change
        self._consent = self._read_consent()
        self.decision: Decision | None = None
        self.vehicle: VehicleReading | None = None
        self.transitions = 0

    def _read_consent(self) -> Consent:
        if self.log is None:
            return consent_from_entries(self._memory)
        try:
            return self.log.consent()
        except ConsentLogError as e:
            log.error("%s; not serving until it is repaired", e)
            return Consent()  # a broken log proves no consent

    def consent(self) -> Consent:
        return self._consent

    def grant(self, now: float, expires: float | None, *, by: str) -> dict[str, Any]:
        if self.log is not None:
            entry = self.log.append("grant", now, by=by, expires=expires)
        else:
            entry = {"op": "grant", "t": now, "start": now, "expires": expires,
                     "scope": [SCOPE_INFERENCE], "by": by}
            self._memory.append(entry)
        self._changed(entry)
        return entry

    def revoke(self, now: float, *, by: str) -> dict[str, Any]:
        if self.log is not None:
            entry = self.log.append("revoke", now, by=by)
        else:
            entry = {"op": "revoke", "t": now, "by": by}
            self._memory.append(entry)
        self._changed(entry)
        return entry

    def _changed(self, entry: dict[str, Any]) -> None:
        self._consent = self._read_consent()
        self._event("consent", op=entry["op"], by=entry["by"], expires=entry.get("expires"))
        self.on_change()

    def evaluate(self, now: float, vehicle: VehicleReading | None) -> Decision:
        """Decide now; log a transition when the action or reason changes."""
        self.vehicle = vehicle
        previous = self.decision
        decision = decide(self.prefs, self._consent, vehicle, now, previous)
        self.decision = decision
        if previous is None or (previous.action, previous.reason) != (decision.action, decision.reason):
            self.transitions += 1
            (log.info if decision.serving else log.warning)(
                "owner policy: %s (%s%s)", decision.action, decision.reason,
                f": {decision.detail}" if decision.detail else "")
            self._event("policy", action=decision.action, reason=decision.reason, detail=decision.detail)
        return decision

    @property
    def serving(self) -> bool:
        return self.decision is not None and self.decision.serving

    def not_serving_reason(self) -> str | None:
        """None while serving; else the reason (what the stage server tells a refused client)."""
        if self.decision is None:
            return "starting"
        return None if self.decision.serving else self.decision.reason

    def status(self, now: float) -> dict[str, Any]:
        c, d = self._consent, self.decision
        return {
            "consent": {"active": c.active(now), "granted_at": c.granted_at, "expires_at": c.expires_at,
                        "revoked_at": c.revoked_at, "scope": list(c.scope)},
            "decision": None if d is None else {"action": d.action, "reason": d.reason,
                                                "since": d.since, "detail": d.detail},
            "vehicle": None if self.vehicle is None else {
                "battery_soc": self.vehicle.battery_soc, "plugged_in": self.vehicle.plugged_in,
                "thermal_headroom_c": self.vehicle.thermal_headroom_c, "parked": self.vehicle.parked,
                "expected_departure": self.vehicle.expected_departure,
                "age_s": round(now - self.vehicle.observed_at, 3)},
            "preferences": {k: getattr(self.prefs, k) for k in self.prefs.__dataclass_fields__},
        }


# --------------------------------------------------------------------------------------------------
# Control socket: one JSON request line, one JSON reply line, per connection.

Handler = Callable[[dict[str, Any]], dict[str, Any]]


async def serve_control(path: Path, handler: Handler, *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on the Unix socket ``path`` (0600, replacing a stale one) until cancelled.

    Each connection sends one JSON object (``{"op": ...}``) and gets one back; a bad request gets
    ``{"ok": false, "error": ...}``; every connection has a ``CONTROL_TIMEOUT_S`` deadline.
    """
    _clear_socket_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(os.fspath(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_one, stream, handler)
    finally:
        _remove(path)
        await listener.aclose()


def _clear_socket_path(path: Path) -> None:
    if path.is_socket() or path.exists():
        if _socket_alive(path):
            raise ConfigError(f"another node already runs with control socket {path}")
        path.unlink()


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        with trio.move_on_after(CONTROL_TIMEOUT_S):
            buf = b""
            while b"\n" not in buf and len(buf) <= MAX_CONTROL_BYTES:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
            try:
                request = json.loads(buf.split(b"\n", 1)[0])
                if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                    raise ValueError("expected a JSON object with an op")
                reply = handler(request)
            except (ValueError, ConfigError, ConsentLogError) as e:
                reply = {"ok": False, "error": str(e)}
            except Exception as e:  # the owner's tool must never take the node down
                log.exception("control request failed")
                reply = {"ok": False, "error": f"internal error: {e!r}"}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(reply).encode() + b"\n")


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(os.fspath(path))
        except OSError:
            return False
    return True


def control_request(path: Path, request: dict[str, Any], *, timeout: float = 5.0) -> dict[str, Any] | None:
    """Send one request to a running node (blocking). None if no node listens at ``path``.
    Raises ConfigError if the socket is not private or the reply is malformed."""
    if not path.exists():
        return None
    check_private(path, "control socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a stale socket: the node is gone
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while b"\n" not in buf and len(buf) <= MAX_CONTROL_BYTES:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    try:
        reply = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise ConfigError(f"the node at {path} sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise ConfigError(f"the node at {path} sent a malformed reply")
    return reply


# --------------------------------------------------------------------------------------------------
# Owner report


def read_events(path: Path, since: float | None = None) -> Iterator[dict[str, Any]]:
    """Events from the JSON-lines log at ``path`` (skipping unreadable lines), ``t >= since``."""
    try:
        f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and isinstance(event.get("t"), int | float) and (
                    since is None or event["t"] >= since):
                yield event


def owner_report(events: Path, *, since: float | None = None, power_w: float = 100.0) -> dict[str, Any]:
    """What this node did for others, from its event log.

    ``sessions``: sessions opened; ``tokens``: positions computed (prompt and generated tokens,
    summed over sessions that closed); ``block_steps``: tokens x blocks of each session;
    ``busy_s``: time spent computing steps; ``energy_wh``: ``busy_s`` x ``power_w``;
    ``battery_used_pct``: the sum of every drop in the published state of charge (charging
    excluded); ``transitions``: every policy decision change with its reason.
    """
    sessions = tokens = block_steps = 0
    busy = battery_used = 0.0
    last_soc: float | None = None
    transitions: list[dict[str, Any]] = []
    consent: list[dict[str, Any]] = []
    first = last = None
    for e in read_events(events, since):
        first = e["t"] if first is None else first
        last = e["t"]
        kind = e.get("event")
        if kind == "session_opened":
            sessions += 1
        elif kind == "session_closed":
            n = int(e.get("tokens") or 0)
            blocks = e.get("blocks") or [0, 0]
            tokens += n
            block_steps += n * max(0, int(blocks[1]) - int(blocks[0]))
            busy += float(e.get("busy_s") or 0.0)
        elif kind == "published" and isinstance(e.get("battery_soc"), int | float):
            soc = float(e["battery_soc"])
            if last_soc is not None and soc < last_soc:
                battery_used += (last_soc - soc) * 100
            last_soc = soc
        elif kind == "policy":
            transitions.append({"t": e["t"], "action": e.get("action"), "reason": e.get("reason"),
                                "detail": e.get("detail", "")})
        elif kind == "consent":
            consent.append({"t": e["t"], "op": e.get("op"), "by": e.get("by"), "expires": e.get("expires")})
    return {
        "since": since if since is not None else first, "until": last,
        "sessions": sessions, "tokens": tokens, "block_steps": block_steps,
        "busy_s": round(busy, 3), "power_w": power_w, "energy_wh": round(busy * power_w / 3600, 4),
        "battery_used_pct": round(battery_used, 3), "transitions": transitions, "consent": consent,
    }



def credits_report(ledger: Ledger | Path | None, *, since: float | None = None) -> dict[str, Any]:
    """The owner report's ``credits``: what this node earned as a server, from its ledger (a
    running node's ``Ledger``, or the file when no node runs; a missing file is an empty ledger).

    ``verified``, ``unverified``, ``rejected``: credits (``protocols.receipts.CREDIT_FLOPS`` FLOPs
    each) by the clients' verdict (only ``verified`` is earned); ``receipts``, ``tokens``,
    ``block_steps``, ``flops`` and ``tokens_verified`` / ``tokens_unverified`` / ``tokens_rejected``
    are the counts behind them; ``refused``: our own client's exchanges that got no receipt."""
    if ledger is None or (isinstance(ledger, Path) and not ledger.exists()):
        totals = Ledger.empty_totals()
        refused = 0
    elif isinstance(ledger, Path):
        with Ledger(ledger) as opened:
            totals, refused = opened.totals(since=since), opened.refused_count(since=since)
    else:
        totals, refused = ledger.totals(since=since), ledger.refused_count(since=since)
    c, n = totals["credits"], totals["token_counts"]
    return {"verified": c["verified"], "unverified": c["unverified"], "rejected": c["rejected"],
            "receipts": totals["sessions"], "tokens": totals["tokens"], "block_steps": totals["block_steps"],
            "flops": totals["flops"], "tokens_verified": n["verified"], "tokens_unverified": n["unverified"],
            "tokens_rejected": n["rejected"], "refused": refused}
