"""The node's side of its owner: read the vehicle, let the owner policy decide, answer the owner.

``OwnerDesk`` (``node.owner_desk``) reads the vehicle each time the publisher asks
(``evaluate_policy``), hands the reading to ``node.owner`` (``OwnerControl``, the one owner of
"may this node serve now") and tells hosting when the action changed; it keeps the last reading
(the record announces it) and answers control-socket requests (``control``). ``open_owner`` and
``open_receipts`` build the owner's consent log and the receipt ledger from the data directory.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.config import NodeConfig
from idlefleet.node.owner.control import (
    ConsentLog,
    DataDir,
    OwnerControl,
    credits_report,
    grant_expiry,
    owner_report,
    vehicle_reading,
)
from idlefleet.node.owner.ledger import Ledger, ReceiptDesk
from idlefleet.node.vehicle.state import VehicleState
from idlefleet.protocols.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from idlefleet.node.runtime.node import Node

log = logging.getLogger(__name__)


def open_owner(config: NodeConfig, key: Ed25519PrivateKey, data_dir: DataDir | None, *, now: float,
               event: Callable[..., None], on_change: Callable[[], None]) -> OwnerControl:
    """The node's owner control: consent from ``data_dir``'s signed log (or memory without one),
    a grant logged now when ``config.consent`` gives it on the command line; ``on_change`` runs
    after every later grant or revocation."""
    owner = OwnerControl(config.preferences,
                         ConsentLog(data_dir.consent_log, key) if data_dir is not None else None,
                         event=event)
    if config.consent:  # consent given on the command line / config file: log it
        owner.grant(now, grant_expiry(now, config.consent_hours, None), by="node --consent")
    owner.on_change = on_change  # later changes publish at once
    return owner


def open_ledger(data_dir: DataDir) -> Ledger:
    """The node's ledger; ConfigError (one line, exit 2) if the file is not a usable SQLite ledger."""
    try:
        return Ledger(data_dir.ledger)
    except sqlite3.Error as e:
        raise ConfigError(f"receipt ledger {data_dir.ledger} is unusable ({e}); move it aside to "
                          "start a new one") from None


def open_receipts(key: Ed25519PrivateKey, peer_id: str,
                  data_dir: DataDir | None) -> tuple[Ledger | None, ReceiptDesk]:
    """Signed work receipts, as a server and as a client (``DATA_DIR/ledger.sqlite``; in memory
    only without a data directory). Raises ConfigError like ``open_ledger``."""
    ledger = open_ledger(data_dir) if data_dir is not None else None
    return ledger, ReceiptDesk(key, peer_id, ledger)


class OwnerDesk:
    """Vehicle readings in, owner decisions out, control requests answered, for ``node``."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.last_vehicle: VehicleState | None = None  # the last state read (the record carries it)
        self._vehicle_error = ""

    def evaluate_policy(self, now: float) -> bool:
        """Read the vehicle and let the owner policy decide; tell hosting when the action changed.
        Returns whether it changed. A missing, invalid or stale vehicle source is ``unknown``."""
        node = self.node
        vehicle = node.vehicle
        try:
            self.last_vehicle = vehicle.read(now)
        except Exception as e:  # a broken sensor must not stop the node (it stops serving)
            (log.warning if str(e) != self._vehicle_error else log.debug)(
                "reading vehicle state (%s) failed: %s", vehicle.name, e)
            self._vehicle_error = str(e)
            reading = None
        else:
            reading = vehicle_reading(vehicle, self.last_vehicle, now, link_metered=node.config.link_metered)
            if reading is None:
                log.debug("vehicle state unknown: %s", getattr(vehicle, "last_error", None))
        before = node.owner.decision
        decision = node.owner.evaluate(now, reading)
        if before is not None and before.action == decision.action:
            return False
        if node.hosting is not None:
            node.hosting.policy_changed(decision)
        return True

    def control(self, request: dict[str, Any], now: float) -> dict[str, Any]:
        """Answer one owner control request (``idlefleet owner ...`` over the control socket).
        Raises ValueError for a request it cannot answer (the socket replies with the message)."""
        node = self.node
        op = request.get("op")
        if op == "consent":
            hours, until = request.get("hours"), request.get("until")
            entry = node.owner.grant(now, grant_expiry(now, hours, until), by="owner consent")
            self.evaluate_policy(now)  # takes effect now, not at the next poll
            return {"ok": True, "entry": entry, **self.status(now)}
        if op == "revoke":
            entry = node.owner.revoke(now, by="owner revoke")
            self.evaluate_policy(now)
            return {"ok": True, "entry": entry, **self.status(now)}
        if op == "status":
            return {"ok": True, **self.status(now)}
        if op == "report":
            since = request.get("since")
            if since is not None and (isinstance(since, bool) or not isinstance(since, int | float)):
                raise ValueError("since must be a unix time")
            events = node.config.events_path
            if events is None:
                raise ValueError("this node keeps no event log")
            report = owner_report(events, since=since, power_w=node.config.power_w)
            report["credits"] = credits_report(node.ledger, since=since)
            return {"ok": True, "report": report}
        raise ValueError(f"unknown op {op!r}; expected consent, revoke, status or report")

    def status(self, now: float) -> dict[str, Any]:
        """What ``idlefleet owner status`` shows: lifecycle, blocks, sessions, consent, decision."""
        node = self.node
        hosting = node.hosting
        server = hosting.server if hosting is not None else None
        return {
            "running": True, "peer_id": node.peer_id, "state": node.state,
            "blocks": list(node.blocks) if node.blocks else None,
            "sessions": server.active_sessions if server is not None else 0,
            "data_dir": None if node.data_dir is None else str(node.data_dir.path),
            **node.owner.status(now),
        }
