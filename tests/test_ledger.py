"""The SQLite receipt ledger: append-only, verified on the way in, durable across SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from idlefleet.node.owner.ledger import DuplicateReceipt, Ledger
from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.receipts import CREDIT_FLOPS
from tests.test_verification import KEYS, receipt


def signed(**changes: object) -> bytes:
    r = receipt(**changes)
    return r.encode(r.sign(KEYS[1]), r.sign(KEYS[0]))


def test_add_verifies_dedupes_and_totals(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        first, new = ledger.add(signed(session=1, flops=CREDIT_FLOPS * 10), "server")
        assert new and first.session == 1
        assert ledger.add(signed(session=1, flops=CREDIT_FLOPS * 10), "server")[1] is False  # same bytes
        ledger.add(signed(session=2, verified=100, unverified=0, rejected=0, flops=CREDIT_FLOPS), "server")
        ledger.add(signed(session=3), "client")  # work we asked for: not our credit
        r = receipt(session=4)
        forged = r.encode(r.sign(KEYS[1]), r.sign(KEYS[3]))  # the client did not sign it
        with pytest.raises(RemoteProtocolError):
            ledger.add(forged, "server")
        with pytest.raises(ValueError, match="role"):
            ledger.add(signed(session=5), "owner")
        totals = ledger.totals()
        assert totals["sessions"] == 2 and totals["tokens"] == 200 and totals["block_steps"] == 2000
        assert totals["credits"] == pytest.approx({"verified": 9.0 + 1.0, "unverified": 0.6, "rejected": 0.4})
        assert [role for role, _ in ledger.receipts()] == ["server", "server", "client"]


def test_ledger_is_append_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.add(signed(), "server")
    db = sqlite3.connect(path)
    for statement in ("UPDATE receipts SET verified = 100", "DELETE FROM receipts"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(statement)
    db.close()


def test_one_receipt_per_session_and_refusals_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.add(signed(session=1), "server")
        with pytest.raises(DuplicateReceipt):  # another verdict for the same session
            ledger.add(signed(session=1, verified=100, unverified=0, rejected=0), "server")
        ledger.add(signed(session=2), "client")
        ledger.add_refused("12D3KooWpeer", 7, "receipt_mismatch", "tokens 4, computed 3", b"proposal", at=5.0)
        assert [role for role, _ in ledger.receipts()] == ["server", "client"]
        assert ledger.refused() == [{"at": 5.0, "peer": "12D3KooWpeer", "session": 7,
                                     "reason": "receipt_mismatch", "detail": "tokens 4, computed 3"}]
        assert ledger.totals()["token_counts"] == {"verified": 90, "unverified": 6, "rejected": 4}
    db = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM refused")
    db.close()


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_receipt(tmp_path: Path) -> None:
    """A process that printed "stored N" has N receipts on disk, whenever it is killed."""
    path = tmp_path / "ledger.sqlite"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from idlefleet.node.owner.ledger import DuplicateReceipt, Ledger
        from tests.test_ledger import signed
        ledger = Ledger(Path({str(path)!r}))
        for i in range(10_000):
            ledger.add(signed(session=i), "server")
            print("stored", i + 1, flush=True)
    """)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.stdout is not None
    acknowledged = 0
    try:
        for line in proc.stdout:
            acknowledged = int(line.split()[1])
            if acknowledged >= 40:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    with Ledger(path) as ledger:
        stored = ledger.receipts()
    assert len(stored) >= acknowledged >= 40
