"""The owner's ledger: every signed work receipt this node took part in, in SQLite.

Append-only: rows are inserted, never changed (triggers refuse UPDATE and DELETE), and a receipt is
stored only after both signatures verify. Each insert is its own transaction, committed with
``synchronous=FULL`` in WAL mode before ``add`` returns, so a node killed with SIGKILL right after
acknowledging a receipt still has it. Opening a ledger that another process holds is fine (SQLite
locks); the file lives in the node's data directory (``ledger.sqlite``).
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

from idlefleet.protocols.receipts import Receipt, credits, decode_receipt

ROLES = ("server", "client")

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
CREATE TRIGGER IF NOT EXISTS receipts_no_update BEFORE UPDATE ON receipts
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS receipts_no_delete BEFORE DELETE ON receipts
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""


class Ledger:
    """Signed receipts of one node. Not thread-safe: use it from one thread (the event loop)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: one transaction per insert
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def add(self, raw: bytes, role: str) -> tuple[Receipt, bool]:
        """Verify ``raw`` (both signatures) and store it; returns the receipt and whether it was new.
        Raises RemoteProtocolError for a receipt that does not verify, ValueError for a bad role."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        r = decode_receipt(raw)
        cur = self._db.execute(
            "INSERT OR IGNORE INTO receipts (digest, role, server, client, model_id, start_block, end_block,"
            " session, opened_at, closed_at, tokens, block_steps, flops, verified, unverified, rejected, raw)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (hashlib.sha256(raw).digest(), role, r.server, r.client, r.model_id, r.start, r.end, r.session,
             r.opened_at, r.closed_at, r.tokens, r.block_steps, r.flops, r.verified, r.unverified, r.rejected,
             raw))
        return r, cur.rowcount == 1

    def receipts(self, *, since: float | None = None, role: str | None = None) -> list[tuple[str, bytes]]:
        """``(role, raw receipt)`` in the order they were stored, optionally closed at/after ``since``."""
        query = "SELECT role, raw FROM receipts WHERE closed_at >= ?"
        args: list[Any] = [since or 0.0]
        if role is not None:
            query += " AND role = ?"
            args.append(role)
        return [(str(row[0]), bytes(row[1])) for row in self._db.execute(query + " ORDER BY id", args)]

    def totals(self, *, since: float | None = None) -> dict[str, Any]:
        """What this node earned as a server: sessions, tokens, block-steps and credits by outcome."""
        out: dict[str, Any] = {"sessions": 0, "tokens": 0, "block_steps": 0,
                               "credits": {"verified": 0.0, "unverified": 0.0, "rejected": 0.0}}
        for _, raw in self.receipts(since=since, role="server"):
            r = decode_receipt(raw)
            out["sessions"] += 1
            out["tokens"] += r.tokens
            out["block_steps"] += r.block_steps
            for key, value in credits(r).items():
                out["credits"][key] += value
        return out

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
