"""The owner's ledger: every signed work receipt this node took part in, in SQLite.

Append-only: rows are inserted, never changed (triggers refuse UPDATE and DELETE), and a receipt is
stored only after both signatures verify. Each insert is its own transaction, committed with
``synchronous=FULL`` in WAL mode before ``add`` returns, so a node killed with SIGKILL right after
acknowledging a receipt still has it. Opening a ledger that another process holds is fine (SQLite
locks); the file lives in the node's data directory (``ledger.sqlite``).

One receipt per session: a second, different receipt with the same role, server and session number
is refused (``DuplicateReceipt``). The ``refused`` table keeps the client's side of exchanges that
failed (the server refused, lied or vanished): who, which session, why, and the client-signed
proposal, so the owner can show what was asked for.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.protocols.errors import IdlefleetError
from idlefleet.protocols.receipts import CREDIT_FLOPS, Receipt, decode_receipt

ROLES = ("server", "client")
LEDGER_FILE = "ledger.sqlite"  # in the node's data directory

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    id          INTEGER PRIMARY KEY,
    digest      BLOB NOT NULL UNIQUE,   -- sha256 of the receipt bytes: the same receipt is stored once
    role        TEXT NOT NULL CHECK (role IN ('server', 'client')),
    server      TEXT NOT NULL,
    client      TEXT NOT NULL,
    model_id    TEXT NOT NULL,
    start_block INTEGER NOT NULL,
    end_block   INTEGER NOT NULL,
    session     INTEGER NOT NULL,
    opened_at   REAL NOT NULL,
    closed_at   REAL NOT NULL,
    tokens      INTEGER NOT NULL,
    block_steps INTEGER NOT NULL,
    flops       REAL NOT NULL,
    verified    INTEGER NOT NULL,
    unverified  INTEGER NOT NULL,
    rejected    INTEGER NOT NULL,
    raw         BLOB NOT NULL            -- the signed receipt exactly as exchanged
);
CREATE INDEX IF NOT EXISTS receipts_closed ON receipts (closed_at);
CREATE UNIQUE INDEX IF NOT EXISTS receipts_session ON receipts (role, server, session);
CREATE TABLE IF NOT EXISTS refused (
    id          INTEGER PRIMARY KEY,
    at          REAL NOT NULL,
    peer        TEXT NOT NULL,           -- the server that did not countersign
    session     INTEGER NOT NULL,
    reason      TEXT NOT NULL,           -- its error code, or bad_countersignature / no_reply / link_lost
    detail      TEXT NOT NULL,
    proposal    BLOB NOT NULL            -- our client-signed proposal: {"body": bin, "client_sig": bin}
);
CREATE TRIGGER IF NOT EXISTS refused_no_update BEFORE UPDATE ON refused
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS refused_no_delete BEFORE DELETE ON refused
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS receipts_no_update BEFORE UPDATE ON receipts
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS receipts_no_delete BEFORE DELETE ON receipts
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""


class DuplicateReceipt(IdlefleetError):
    """The ledger already holds another receipt for this role, server and session."""


class Ledger:
    """Signed receipts of one node. Safe to call from worker threads (one lock serialises access),
    so the node commits (fsync) off its event loop."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # autocommit: one transaction per insert; any thread (under the lock)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def add(self, raw: bytes, role: str) -> tuple[Receipt, bool]:
        """Verify ``raw`` (both signatures) and store it; returns the receipt and whether it was new
        (False: these exact bytes were stored before). Committed to disk when it returns.
        Raises RemoteProtocolError for a receipt that does not verify, DuplicateReceipt for another
        receipt of the same session, ValueError for a bad role."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        r = decode_receipt(raw)
        digest = hashlib.sha256(raw).digest()
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO receipts (digest, role, server, client, model_id, start_block, end_block,"
                    " session, opened_at, closed_at, tokens, block_steps, flops, verified, unverified,"
                    " rejected, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (digest, role, r.server, r.client, r.model_id, r.start, r.end, r.session,
                     r.opened_at, r.closed_at, r.tokens, r.block_steps, r.flops, r.verified, r.unverified,
                     r.rejected, raw))
            except sqlite3.IntegrityError:
                same = self._db.execute("SELECT 1 FROM receipts WHERE digest = ?", (digest,)).fetchone()
                if same is None:
                    raise DuplicateReceipt(f"a receipt for session {r.session} of {r.server[-8:]} "
                                           f"is already stored ({role})") from None
                return r, False
        return r, True

    def has_session(self, role: str, server: str, session: int) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM receipts WHERE role = ? AND server = ? AND session = ?",
                                    (role, server, session)).fetchone() is not None

    def add_refused(self, peer: str, session: int, reason: str, detail: str, proposal: bytes,
                    at: float | None = None) -> None:
        """Record that ``peer`` did not countersign our proposal for ``session`` (committed)."""
        with self._lock:
            self._db.execute("INSERT INTO refused (at, peer, session, reason, detail, proposal)"
                             " VALUES (?, ?, ?, ?, ?, ?)",
                             (time.time() if at is None else at, peer, session, reason, detail[:500],
                              proposal))

    def refused(self, *, since: float | None = None) -> list[dict[str, Any]]:
        """Failed exchanges (client side), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT at, peer, session, reason, detail FROM refused"
                                    " WHERE at >= ? ORDER BY id", (since or 0.0,)).fetchall()
        return [{"at": at, "peer": peer, "session": session, "reason": reason, "detail": detail}
                for at, peer, session, reason, detail in rows]

    def receipts(self, *, since: float | None = None, role: str | None = None) -> list[tuple[str, bytes]]:
        """``(role, raw receipt)`` in the order they were stored, optionally closed at/after ``since``."""
        query = "SELECT role, raw FROM receipts WHERE closed_at >= ?"
        args: list[Any] = [since or 0.0]
        if role is not None:
            query += " AND role = ?"
            args.append(role)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [(str(row[0]), bytes(row[1])) for row in rows]

    def totals(self, *, since: float | None = None) -> dict[str, Any]:
        """What this node earned as a server (receipts it countersigned, closed at/after ``since``):
        ``sessions`` (receipts), ``tokens``, ``block_steps``, ``flops``, ``credits`` and
        ``token_counts`` by outcome (``verified``, ``unverified``, ``rejected``). Summed in SQL
        (every row was verified when it was stored); ``protocols.receipts.credits`` per row."""
        with self._lock:
            row = self._db.execute(
                "SELECT count(*), total(tokens), total(block_steps), total(flops), total(verified),"
                " total(unverified), total(rejected),"
                " total(CASE WHEN tokens > 0 THEN flops * verified / tokens END),"
                " total(CASE WHEN tokens > 0 THEN flops * unverified / tokens END),"
                " total(CASE WHEN tokens > 0 THEN flops * rejected / tokens END)"
                " FROM receipts WHERE role = 'server' AND closed_at >= ?", (since or 0.0,)).fetchone()
        n, tokens, block_steps, flops, verified, unverified, rejected, fv, fu, fr = row
        return {"sessions": int(n), "tokens": int(tokens), "block_steps": int(block_steps), "flops": flops,
                "credits": {"verified": fv / CREDIT_FLOPS, "unverified": fu / CREDIT_FLOPS,
                            "rejected": fr / CREDIT_FLOPS},
                "token_counts": {"verified": int(verified), "unverified": int(unverified),
                                 "rejected": int(rejected)}}

    @staticmethod
    def empty_totals() -> dict[str, Any]:
        """``totals`` of a ledger with no receipts."""
        return {"sessions": 0, "tokens": 0, "block_steps": 0, "flops": 0.0,
                "credits": {"verified": 0.0, "unverified": 0.0, "rejected": 0.0},
                "token_counts": {"verified": 0, "unverified": 0, "rejected": 0}}

    def refused_count(self, *, since: float | None = None) -> int:
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM refused WHERE at >= ?", (since or 0.0,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ReceiptDesk:
    """What a node signs receipts with: its key and peer id, and its ledger (None: a node without a
    data directory keeps none; its server then signs no receipts, its client keeps no copies)."""

    key: Ed25519PrivateKey
    peer_id: str
    ledger: Ledger | None
