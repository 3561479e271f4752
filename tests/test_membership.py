"""NoticeGate and DialBudget: peer-down notices as hints, bounded dials. Pure, table-driven."""

from __future__ import annotations

import pytest

from idlefleet.protocols.membership import (
    FORWARD,
    DialBudget,
    DialConfig,
    MembershipConfig,
    NoticeGate,
    TokenBuckets,
)

ME, R, R2, S = "me", "reporter", "reporter2", "subject"
MAX_SEQ = 2**63 - 1


@pytest.mark.parametrize(("subject", "subject_seq", "last_seen", "verdict", "covered"), [
    (ME, 5, None, "refute", -1),  # about us: refute, whatever we know
    (S, 5, None, "unknown", -1),  # nothing to evict
    (S, 4, 5, "stale", -1),  # already refuted by a record we hold
    (S, 5, 5, "check", 5),
    (S, MAX_SEQ, 5, "check", 5),  # the reporter's number never reaches past what we saw
])
def test_first_notice_verdicts(subject: str, subject_seq: int, last_seen: int | None, verdict: str,
                               covered: int) -> None:
    gate = NoticeGate(ME)
    assert gate.on_notice(R, subject, subject_seq, 0.0, last_seen_seq=last_seen) == (verdict, covered)
    assert (verdict in FORWARD) is True


def test_a_running_check_absorbs_further_notices() -> None:
    gate = NoticeGate(ME)
    assert gate.on_notice(R, S, 5, 0.0, last_seen_seq=5)[0] == "check"
    assert gate.on_notice(R2, S, 6, 0.1, last_seen_seq=6) == ("checking", 6)
    assert gate.checking() == {S}
    assert gate.on_check_done(S, alive=False, now=1.0) == 6
    assert gate.checking() == frozenset()


def test_a_subject_found_alive_is_not_rechecked_at_once() -> None:
    config = MembershipConfig(recheck_s=5.0)
    gate = NoticeGate(ME, config)
    gate.on_notice(R, S, 5, 0.0, last_seen_seq=5)
    assert gate.on_check_done(S, alive=True, now=2.0) is None
    assert gate.on_notice(R2, S, 5, 3.0, last_seen_seq=5)[0] == "stale"
    assert gate.on_notice(R2, S, 5, 7.0, last_seen_seq=5)[0] == "check"


def test_reporters_are_rate_limited_and_refill() -> None:
    gate = NoticeGate(ME, MembershipConfig(notice_burst=5, notice_refill_s=10.0))
    verdicts = [gate.on_notice(R, ME, i, 0.0, last_seen_seq=None)[0] for i in range(300)]
    assert verdicts.count("refute") == 5  # 300 notices about us: five refutations at most
    assert set(verdicts[5:]) == {"rate_limited"}
    assert "rate_limited" not in FORWARD
    assert gate.on_notice(R2, ME, 0, 0.0, last_seen_seq=None)[0] == "refute"  # per reporter
    assert gate.on_notice(R, ME, 0, 9.9, last_seen_seq=None)[0] == "rate_limited"
    assert gate.on_notice(R, ME, 0, 10.0, last_seen_seq=None)[0] == "refute"


def test_concurrent_checks_are_bounded() -> None:
    gate = NoticeGate(ME, MembershipConfig(max_checks=2))
    got = [gate.on_notice(f"r{i}", f"s{i}", 1, 0.0, last_seen_seq=1)[0] for i in range(4)]
    assert got == ["check", "check", "busy", "busy"]
    gate.on_check_done("s0", alive=True, now=1.0)
    assert gate.on_notice("r9", "s9", 1, 1.0, last_seen_seq=1)[0] == "check"


def test_token_buckets_memory_is_bounded() -> None:
    buckets = TokenBuckets(burst=1, refill_s=10.0, max_keys=3)
    assert all(buckets.take(k, 0.0) for k in "abc")
    assert buckets.take("d", 1.0) is False  # every bucket is in use: no room for a new key
    assert buckets.take("d", 10.0) is True  # full ones are forgotten to make room
    assert len(buckets) <= 3


# --- DialBudget ---------------------------------------------------------------------------------


def test_dials_are_deduplicated_per_peer_and_address() -> None:
    budget = DialBudget(DialConfig(max_addrs=2, backoff_s=30.0))
    addrs = ["/ip4/127.0.0.1/tcp/9", "/ip4/127.0.0.1/tcp/9", "/ip4/10.0.0.1/tcp/9", "/ip4/10.0.0.2/tcp/9"]
    assert budget.plan("p1", addrs, 0.0) == addrs[1:3]
    assert budget.plan("p1", addrs, 0.1) == []  # one dial per peer at a time
    # Another record listing the same victim address gets nothing more to dial there.
    assert budget.plan("p2", addrs[:2], 0.2) == []


def test_five_records_pointing_at_one_port_cost_one_dial() -> None:
    # Finding 3 of issue 8: 5 records x 8 addresses made 40 connections to one arbitrary port.
    budget = DialBudget()
    victim = [f"/ip4/127.0.0.1/tcp/{9000 + i}" for i in range(8)]
    dialled = [a for i in range(5) for a in budget.plan(f"fake{i}", victim, 0.0)]
    assert len(dialled) == DialConfig().max_addrs * 2
    assert len(set(dialled)) == len(dialled)


def test_failed_dials_back_off_exponentially_and_success_resets() -> None:
    budget = DialBudget(DialConfig(backoff_s=30.0, max_backoff_s=100.0))
    a = ["/ip4/127.0.0.1/tcp/1"]
    assert budget.plan("p", a, 0.0) == a
    budget.done("p", False, 1.0)
    assert budget.plan("p", a, 30.9) == []
    assert budget.plan("p", a, 31.0) == a
    budget.done("p", False, 31.0)
    assert budget.plan("p", a, 90.9) == []  # 60 s after the second failure
    assert budget.plan("p", a, 91.0) == a
    budget.done("p", True, 91.0, a)
    assert budget.plan("p", a, 91.0) == a


def test_global_dial_rate() -> None:
    budget = DialBudget(DialConfig(dial_burst=3, dial_refill_s=2.0))
    got = [bool(budget.plan(f"p{i}", [f"/ip4/10.0.0.{i}/tcp/1"], 0.0)) for i in range(10)]
    assert got == [True] * 3 + [False] * 7
    assert budget.plan("p20", ["/ip4/10.0.1.1/tcp/1"], 2.0)
    assert not budget.plan("p21", ["/ip4/10.0.1.2/tcp/1"], 2.0)
