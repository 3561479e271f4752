"""Is this node serving, and is that peer usable? Two pure functions, no I/O.

They are the two halves of one contract: ``serving_decision`` says what a node announces in its
record and whether its stage server admits work; ``peer_usable`` says how a reader of records uses
a peer for what it announced.

``serving_decision(lifecycle, decision, hosting) -> Serving`` from

- ``lifecycle`` (``LIFECYCLES``, owned by the node): ``starting`` (up, not yet announced online),
  ``running``, ``draining`` (``Node.drain``: no new sessions, running ones move), ``closing``
  (saying goodbye);
- ``decision``: the owner's ``protocols.policy.Decision`` (None before its first evaluation);
- ``hosting`` (``HOSTING``): ``none`` (no hosting component: a node that gossips or runs a client
  only), ``loading`` (hosting, but no stage served: a claimed range loading, or unloaded), ``ready``
  (a stage server serves the announced range).

The record's ``policy`` and ``policy_reason`` are the decision's action and reason (``stop``,
``starting`` before the first decision). Its ``state`` (first row that applies wins):

=========  =======  ===========  =========  ==================================================
lifecycle  hosting  policy       state      why
=========  =======  ===========  =========  ==================================================
closing    any      any          offline    peers drop us now rather than at record expiry
draining   any      any          draining   clients move their sessions
starting   any      any          joining    not announced online yet
running    none     any          online     hosts nothing; its policy field says if it serves
running    loading  any          joining    not routable until its blocks are served
running    ready    drain, stop  draining   the owner's policy says no new sessions
running    ready    serve        online
=========  =======  ===========  =========  ==================================================

Admission (``Serving.refusal``: None, or the session error code and message a refused client
gets), first row that applies wins:

====================  ================  ===================================================
when                  code              message
====================  ================  ===================================================
hosting not ready     ``ERR_BUSY``      still loading blocks (none: serves no blocks)
closing               ``ERR_DRAINING``  this node is shutting down; use another peer
draining              ``ERR_DRAINING``  this node is draining; use another peer
policy not serve      ``ERR_DRAINING``  not serving (owner policy: <reason>); use another peer
otherwise             admitted
====================  ================  ===================================================

``Serving.move_on`` (step results carry ``draining``: clients move running sessions elsewhere) is
set while closing or draining, or while the policy is not ``serve``.

``peer_usable(record, use, model_id=...) -> str | None``: why the peer of a live record (one the
fleet view holds alive) may not be used for ``use`` (``USES``), or None if it may. Each use adds
its rows to the one above it:

============  ===========================================================  =====================
use           the record must                                              reason otherwise
============  ===========================================================  =====================
``dial``      not announce ``offline``                                     ``offline``
``hosts``     announce blocks of ``model_id``                              ``other_model``,
                                                                           ``no_blocks``
``coverage``  be ``joining`` or ``online`` (a claim counts as hosting;     ``state_<state>``
              a draining peer is leaving)
``route``     be ``online`` or ``draining`` (routing charges draining),    ``state_<state>``,
              and its policy ``serve``                                     ``policy_<action>``
============  ===========================================================  =====================

``route`` judges the record only: the node hands routing only records of peers it completed a
liveness round trip with (``Node.routable``), and routing itself excludes overloaded and banned
peers (``protocols.routing.exclusion``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from idlefleet.protocols.errors import LocalProtocolError
from idlefleet.protocols.policy import Decision
from idlefleet.protocols.routing import ROUTABLE_STATES
from idlefleet.protocols.session import ERR_BUSY, ERR_DRAINING

__all__ = [
    "ADMITTING",
    "COVERAGE_STATES",
    "HOSTING",
    "LIFECYCLES",
    "LIFECYCLE_STATE",
    "USES",
    "RecordLike",
    "Serving",
    "peer_usable",
    "serving_decision",
]

LIFECYCLES = ("starting", "running", "draining", "closing")
HOSTING = ("none", "loading", "ready")
#: The lifecycle in the record's words (what ``Node.state`` reports).
LIFECYCLE_STATE = {"starting": "joining", "running": "online", "draining": "draining", "closing": "offline"}
#: States whose announced blocks count toward coverage (placement): claims count, leavers do not.
COVERAGE_STATES = ("joining", "online")
USES = ("dial", "hosts", "coverage", "route")


@dataclass(frozen=True)
class Serving:
    """What the node announces (``state``, ``policy``, ``policy_reason``) and whether its stage
    server admits a new session (``refusal`` None) or asks running ones to move (``move_on``)."""

    state: str
    policy: str
    policy_reason: str
    refusal: tuple[str, str] | None
    move_on: bool

    @property
    def admits(self) -> bool:
        return self.refusal is None


def serving_decision(lifecycle: str, decision: Decision | None, hosting: str) -> Serving:
    """The rule tables of the module docstring. Raises LocalProtocolError for a lifecycle or
    hosting value not in ``LIFECYCLES`` / ``HOSTING`` (our own bug, never a peer's)."""
    if lifecycle not in LIFECYCLES:
        raise LocalProtocolError(f"unknown lifecycle {lifecycle!r}; expected one of {LIFECYCLES}")
    if hosting not in HOSTING:
        raise LocalProtocolError(f"unknown hosting readiness {hosting!r}; expected one of {HOSTING}")
    policy, reason = (decision.action, decision.reason) if decision is not None else ("stop", "starting")
    serve = policy == "serve"
    if lifecycle == "running" and hosting == "loading":
        state = "joining"
    elif lifecycle == "running" and hosting == "ready" and not serve:
        state = "draining"
    else:
        state = LIFECYCLE_STATE[lifecycle]
    refusal: tuple[str, str] | None = None
    if hosting != "ready":
        refusal = ERR_BUSY, "still loading blocks" if hosting == "loading" else "this node serves no blocks"
    elif lifecycle == "closing":
        refusal = ERR_DRAINING, "this node is shutting down; use another peer"
    elif lifecycle == "draining":
        refusal = ERR_DRAINING, "this node is draining; use another peer"
    elif not serve:
        refusal = ERR_DRAINING, f"not serving (owner policy: {reason}); use another peer"
    move_on = lifecycle in ("closing", "draining") or not serve
    return Serving(state, policy, reason, refusal, move_on)


#: A stage server on its own (no node around it): admits everything, asks nobody to move.
ADMITTING = Serving("online", "serve", "ok", None, False)


class RecordLike(Protocol):
    """What ``peer_usable`` reads: ``protocols.records.CapacityRecord`` fits."""

    @property
    def state(self) -> str: ...
    @property
    def policy(self) -> str: ...
    @property
    def model_id(self) -> str: ...
    @property
    def blocks(self) -> tuple[int, int] | None: ...


def peer_usable(record: RecordLike, use: str, *, model_id: str = "") -> str | None:
    """Why ``record``'s peer may not be used for ``use`` (the module docstring's table), or None
    if it may. ``model_id`` is required for every use but ``dial``. Raises LocalProtocolError for
    an unknown use (our own bug)."""
    if use not in USES:
        raise LocalProtocolError(f"unknown use {use!r}; expected one of {USES}")
    if record.state == "offline":
        return "offline"
    if use == "dial":
        return None
    if record.model_id != model_id:
        return "other_model"
    if record.blocks is None:
        return "no_blocks"
    if use == "coverage" and record.state not in COVERAGE_STATES:
        return f"state_{record.state}"
    if use == "route":
        if record.state not in ROUTABLE_STATES:
            return f"state_{record.state}"
        if record.policy != "serve":
            return f"policy_{record.policy}"
    return None
