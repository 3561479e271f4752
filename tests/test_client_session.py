"""The client's side of a session (protocols.session.ClientSession): every allowed transition of
the table, and every other (state, event) pair refused with the error naming whose fault it is: a
server's unexpected message is a RemoteProtocolError, our own illegal move a LocalProtocolError."""

from __future__ import annotations

import itertools

import pytest

from idlefleet.protocols import session as S
from idlefleet.protocols.errors import LocalProtocolError, RemoteProtocolError

C = S.ClientState
EVENTS = sorted(S.CLIENT_MOVES | S.CLIENT_RECEIVES)


def machine_in(state: S.ClientState) -> S.ClientSession:
    m = S.ClientSession()
    m.state = state
    return m


def feed(m: S.ClientSession, event: str) -> S.ClientState:
    return m.send(event) if event in S.CLIENT_MOVES else m.receive(event)


def test_moves_and_received_kinds_are_disjoint_and_cover_the_table() -> None:
    assert not S.CLIENT_MOVES & S.CLIENT_RECEIVES
    assert {event for _, event in S.CLIENT_TRANSITIONS} == S.CLIENT_MOVES | S.CLIENT_RECEIVES
    # Every message kind the client sends or receives is a registered wire kind.
    for kind in S.CLIENT_MOVES | S.CLIENT_RECEIVES:
        if kind not in {"chained_step", "fail", "chain_done", "chain_broken", "keep", "reset", "draining"}:
            assert kind in S.wire.KINDS, kind


@pytest.mark.parametrize(("state", "event"), sorted(S.CLIENT_TRANSITIONS, key=str))
def test_every_allowed_transition(state: S.ClientState, event: str) -> None:
    m = machine_in(state)
    assert feed(m, event) is S.CLIENT_TRANSITIONS[state, event] is m.state


DISALLOWED = [(s, e) for s, e in itertools.product(C, EVENTS) if (s, e) not in S.CLIENT_TRANSITIONS]


@pytest.mark.parametrize(("state", "event"), DISALLOWED, ids=[f"{s.value}-{e}" for s, e in DISALLOWED])
def test_every_disallowed_transition_raises_the_right_error(state: S.ClientState, event: str) -> None:
    m = machine_in(state)
    if event in S.CLIENT_RECEIVES:
        with pytest.raises(RemoteProtocolError, match=f"unexpected '{event}'.*{state.value}"):
            m.receive(event)
    else:
        with pytest.raises(LocalProtocolError, match=f"may not '{event}'.*{state.value}"):
            m.send(event)
    assert m.state is state  # a refused event changes nothing


def test_a_move_fed_as_a_received_kind_and_back_is_refused() -> None:
    m = machine_in(C.OPEN)
    with pytest.raises(RemoteProtocolError):
        m.receive("step")  # a server cannot send a step
    with pytest.raises(LocalProtocolError):
        m.send("step_result")  # nor can we send a reply
    with pytest.raises(LocalProtocolError):
        m.send("no_such_move")
    assert m.state is C.OPEN


def test_a_whole_session_with_a_refusal_a_chain_a_late_reply_and_a_receipt() -> None:
    m = S.ClientSession()
    path = [("session_open", C.OPENING), ("error", C.IDLE), ("session_open", C.OPENING),
            ("session_opened", C.OPEN), ("step", C.STEPPING), ("step_result", C.OPEN),
            ("chained_step", C.CHAINED), ("chain_failed", C.CHAINED), ("chain_broken", C.OPEN),
            ("step", C.STEPPING), ("chain_result", C.STEPPING), ("step_result", C.OPEN),
            ("draining", C.DRAINING), ("receipt_proposal", C.RECEIPT), ("step_result", C.RECEIPT),
            ("receipt", C.SETTLED), ("session_close", C.CLOSING), ("session_closed", C.CLOSED)]
    for event, state in path:
        assert feed(m, event) is state, event
    with pytest.raises(LocalProtocolError):
        m.send("reset")  # closed is final


def test_a_failed_session_may_only_settle_its_receipt_and_go() -> None:
    m = machine_in(C.STEPPING)
    m.send("fail")
    for event in ("step", "chained_step", "keep"):
        with pytest.raises(LocalProtocolError):
            m.send(event)
    with pytest.raises(RemoteProtocolError):
        m.receive("step_result")  # a late reply is only expected once a receipt is proposed
    assert m.send("receipt_proposal") is C.RECEIPT
    assert m.receive("step_result") is C.RECEIPT  # the step we gave up on
    assert m.receive("error") is C.SETTLED  # refused (e.g. receipt_mismatch): closing
    with pytest.raises(LocalProtocolError):
        m.send("receipt_proposal")  # one receipt per session
    assert m.send("reset") is C.CLOSED
