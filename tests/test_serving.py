"""protocols/serving.py: the serving decision's rule tables, row by row, and the usable-peer predicate."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from idlefleet.protocols.errors import LocalProtocolError
from idlefleet.protocols.policy import Decision
from idlefleet.protocols.serving import (
    ADMITTING,
    HOSTING,
    LIFECYCLE_STATE,
    LIFECYCLES,
    USES,
    peer_usable,
    serving_decision,
)
from idlefleet.protocols.session import ERR_BUSY, ERR_DRAINING

SERVE = Decision("serve", "ok", 0.0)
DRAIN = Decision("drain", "departure_soon", 0.0)
STOP = Decision("stop", "driving", 0.0)
DECISIONS = {"serve": SERVE, "drain": DRAIN, "stop": STOP, "none": None}

# lifecycle, hosting, decision -> record state (the module docstring's first table)
STATE_ROWS = [
    ("closing", "ready", "serve", "offline"),
    ("closing", "none", "stop", "offline"),
    ("draining", "ready", "serve", "draining"),
    ("draining", "loading", "stop", "draining"),
    ("starting", "ready", "serve", "joining"),
    ("starting", "none", "none", "joining"),
    ("running", "none", "stop", "online"),  # a client-only node: its policy field says stop
    ("running", "none", "serve", "online"),
    ("running", "loading", "serve", "joining"),
    ("running", "loading", "stop", "joining"),
    ("running", "ready", "drain", "draining"),
    ("running", "ready", "stop", "draining"),
    ("running", "ready", "none", "draining"),  # no decision yet: policy stop/starting
    ("running", "ready", "serve", "online"),
]


@pytest.mark.parametrize(("lifecycle", "hosting", "decision", "state"), STATE_ROWS)
def test_record_state(lifecycle: str, hosting: str, decision: str, state: str) -> None:
    assert serving_decision(lifecycle, DECISIONS[decision], hosting).state == state


@pytest.mark.parametrize(("decision", "policy"), [
    ("serve", ("serve", "ok")), ("drain", ("drain", "departure_soon")), ("stop", ("stop", "driving")),
    ("none", ("stop", "starting")),
])
def test_record_policy_is_the_owners_decision(decision: str, policy: tuple[str, str]) -> None:
    for lifecycle, hosting in itertools.product(LIFECYCLES, HOSTING):
        s = serving_decision(lifecycle, DECISIONS[decision], hosting)
        assert (s.policy, s.policy_reason) == policy


# lifecycle, hosting, decision -> refusal code and a word of its message (None: admitted)
ADMISSION_ROWS = [
    ("running", "loading", "serve", (ERR_BUSY, "still loading blocks")),
    ("closing", "loading", "stop", (ERR_BUSY, "still loading blocks")),  # hosting's row comes first
    ("running", "none", "serve", (ERR_BUSY, "serves no blocks")),
    ("closing", "ready", "serve", (ERR_DRAINING, "shutting down")),
    ("closing", "ready", "stop", (ERR_DRAINING, "shutting down")),
    ("draining", "ready", "serve", (ERR_DRAINING, "this node is draining")),
    ("draining", "ready", "stop", (ERR_DRAINING, "this node is draining")),
    ("running", "ready", "stop", (ERR_DRAINING, "owner policy: driving")),
    ("running", "ready", "drain", (ERR_DRAINING, "owner policy: departure_soon")),
    ("starting", "ready", "none", (ERR_DRAINING, "owner policy: starting")),
    ("starting", "ready", "serve", None),  # served before announced online (as before)
    ("running", "ready", "serve", None),
]


@pytest.mark.parametrize(("lifecycle", "hosting", "decision", "refusal"), ADMISSION_ROWS)
def test_admission(lifecycle: str, hosting: str, decision: str, refusal: tuple[str, str] | None) -> None:
    s = serving_decision(lifecycle, DECISIONS[decision], hosting)
    if refusal is None:
        assert s.admits and s.refusal is None
    else:
        assert s.refusal is not None and not s.admits
        assert s.refusal[0] == refusal[0] and refusal[1] in s.refusal[1]


def test_move_on_follows_lifecycle_and_policy_only() -> None:
    for lifecycle, hosting, decision in itertools.product(LIFECYCLES, HOSTING, DECISIONS):
        s = serving_decision(lifecycle, DECISIONS[decision], hosting)
        assert s.move_on == (lifecycle in ("draining", "closing") or decision != "serve")


def test_every_input_gets_an_answer_and_the_lifecycle_words_are_record_states() -> None:
    for lifecycle, hosting, decision in itertools.product(LIFECYCLES, HOSTING, DECISIONS):
        s = serving_decision(lifecycle, DECISIONS[decision], hosting)
        assert s.state in LIFECYCLE_STATE.values()
        open_for_work = lifecycle in ("starting", "running") and decision == "serve"
        assert s.admits == (hosting == "ready" and open_for_work)
    assert serving_decision("running", SERVE, "ready") == ADMITTING


@pytest.mark.parametrize(("lifecycle", "hosting"), [("online", "ready"), ("running", "loaded")])
def test_unknown_inputs_are_our_own_bug(lifecycle: str, hosting: str) -> None:
    with pytest.raises(LocalProtocolError):
        serving_decision(lifecycle, SERVE, hosting)


# -- peer_usable -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rec:
    state: str = "online"
    policy: str = "serve"
    model_id: str = "m"
    blocks: tuple[int, int] | None = (0, 4)


# record, use -> reason (None: usable); the module docstring's second table
USABLE_ROWS = [
    (Rec(), "dial", None),
    (Rec(state="joining", blocks=None, model_id=""), "dial", None),
    (Rec(state="offline"), "dial", "offline"),
    (Rec(), "hosts", None),
    (Rec(state="draining", policy="stop"), "hosts", None),
    (Rec(state="offline"), "hosts", "offline"),
    (Rec(model_id="other"), "hosts", "other_model"),
    (Rec(blocks=None), "hosts", "no_blocks"),
    (Rec(state="joining"), "coverage", None),  # a claim counts
    (Rec(state="online", policy="stop"), "coverage", None),
    (Rec(state="draining"), "coverage", "state_draining"),
    (Rec(blocks=None), "coverage", "no_blocks"),
    (Rec(), "route", None),
    (Rec(state="draining"), "route", None),  # at a penalty (protocols.routing)
    (Rec(state="joining"), "route", "state_joining"),
    (Rec(policy="drain"), "route", "policy_drain"),
    (Rec(state="draining", policy="stop"), "route", "policy_stop"),
    (Rec(model_id="other"), "route", "other_model"),
    (Rec(state="offline"), "route", "offline"),
]


@pytest.mark.parametrize(("record", "use", "reason"), USABLE_ROWS)
def test_peer_usable(record: Rec, use: str, reason: str | None) -> None:
    assert peer_usable(record, use, model_id="m") == reason


def test_each_use_is_stricter_than_the_one_before() -> None:
    records = [Rec(state=s, policy=p, model_id=m, blocks=b)
               for s in ("joining", "online", "draining", "offline")
               for p in ("serve", "drain", "stop") for m in ("m", "x") for b in ((0, 4), None)]
    for record in records:
        usable = [peer_usable(record, use, model_id="m") is None for use in USES]
        assert usable[1] <= usable[0] and usable[2] <= usable[1] and usable[3] <= usable[1]


def test_a_record_announced_by_serving_decision_reads_back_as_intended() -> None:
    """The two halves agree: a ready, serving, running node is routable and counts toward
    coverage; a draining one is routable (at a penalty) while its policy serves; one still
    loading counts toward coverage but takes no route; a closing one is not even dialled."""
    def announced(lifecycle: str, decision: Decision, hosting: str) -> Rec:
        s = serving_decision(lifecycle, decision, hosting)
        return Rec(state=s.state, policy=s.policy)

    def uses(record: Rec) -> set[str]:
        return {u for u in USES if peer_usable(record, u, model_id="m") is None}

    assert uses(announced("running", SERVE, "ready")) == set(USES)
    assert uses(announced("draining", SERVE, "ready")) == {"dial", "hosts", "route"}
    assert uses(announced("running", STOP, "ready")) == {"dial", "hosts"}
    assert uses(announced("running", SERVE, "loading")) == {"dial", "hosts", "coverage"}
    assert uses(announced("closing", SERVE, "ready")) == set()


def test_unknown_use_is_our_own_bug() -> None:
    with pytest.raises(LocalProtocolError):
        peer_usable(Rec(), "borrow", model_id="m")
