"""Gossip in the fleet: ``publish.should_publish`` for every running node whose record changed,
refreshes, goodbyes, and the bytes they cost (real signed record sizes, the regional mesh degree)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple, cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.sim.fleet import T0, region_name
from idlefleet.node.sim.scenario import Scenario
from idlefleet.node.vehicle import physics
from idlefleet.protocols.peerid import peer_id_from_public_key
from idlefleet.protocols.publish import should_publish
from idlefleet.protocols.records import CapacityRecord, encode_signed

if TYPE_CHECKING:
    from idlefleet.node.sim.engine import Simulation

STATES = ("online", "draining", "offline")


class _RecordView(NamedTuple):
    """The fields ``should_publish`` compares, with the node record's names (a signed
    ``CapacityRecord`` costs ~0.1 ms to build; the policy only reads fields)."""

    state: str
    plugged_in: bool
    consent: bool
    consent_expires: float | None
    link_kind: str
    link_metered: bool
    model_id: str
    blocks: tuple[int, int] | None
    addrs: tuple[str, ...]
    region: str
    expected_departure: float | None
    parked_since: float | None
    battery_soc: float
    thermal_headroom_c: float
    load: float
    free_memory_mb: int
    issued_at: float


def record_sizes(scn: Scenario) -> dict[tuple[int, bool, bool], int]:
    """Signed record sizes on the wire by (state, hosts blocks, announces a departure): real
    ``encode_signed`` output for a record like the simulated node would send."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    pub = key.public_key().public_bytes_raw()
    base = CapacityRecord(
        peer_id=peer_id_from_public_key(pub), public_key=pub, addrs=("/ip4/203.0.113.7/tcp/4001",),
        region=region_name(0), state="online", battery_soc=0.61803, plugged_in=True, charging_kw=7.4,
        thermal_headroom_c=41.5, parked_since=T0 + 1234.5, expected_departure=None, consent=True,
        consent_expires=None, link_kind="wifi", link_metered=False, compute_gflops=2000.0,
        free_memory_mb=12_000, load=0.25, model_id=f"sim-{scn.model.blocks}-blocks", blocks=None,
        seq=123_456, issued_at=T0 + 5000.25, expires_at=T0 + 5000.25 + scn.record_ttl_s,
    )
    sizes = {}
    for s, state in enumerate(STATES):
        for blocks in (False, True):
            for dep in (False, True):
                rec = replace(base, state=state, blocks=(10, 22) if blocks else None,
                              expected_departure=T0 + 40_000.5 if dep else None)
                sizes[(s, blocks, dep)] = len(encode_signed(rec, key))
    return sizes


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out: np.ndarray = (a == b) | (np.isnan(a) & np.isnan(b))
    return out


def _blk(code: int) -> tuple[int, int] | None:
    return None if code < 0 else (code // 10_000, code % 10_000)


def gossip(sim: Simulation, now: float) -> None:
    f, scn = sim.fleet, sim.scn
    pol = scn.publish
    dt = scn.step_s
    now_u = T0 + now
    running = f.opted_in & sim.parked & ~sim.net_out
    started = running & ~sim.running
    stopped = sim.running & ~running
    sim.h["dht_lookups"] += int(started.sum())  # a node joining the DHT looks itself up
    sim.running = running
    state = sim.action.copy()  # SERVE/DRAIN/STOP -> online/draining/offline
    blk = np.where(sim.hosting, sim.h_start * 10_000 + sim.h_end, -1)
    load = sim.util
    head = physics.headroom_c(f.limit_c, sim.temp)
    plug = sim.plug_now() > 0
    consent = f.opted_in & ~(T0 + np.nan_to_num(f.revoke_at, nan=np.inf) <= now_u)
    cur: tuple[np.ndarray, ...] = (state, plug, blk, sim.announced, sim.parked_since, consent,
                                   sim.soc, head, load)
    old: tuple[np.ndarray, ...] = (sim.pub_state, sim.pub_plug, sim.pub_blk, sim.pub_ann,
                                   sim.pub_since, sim.pub_consent, sim.pub_soc, sim.pub_head,
                                   sim.pub_load)
    if sim.exact:
        check = running
    else:  # a superset of the cars whose record changed significantly (the policy decides)
        discrete = ((state != sim.pub_state) | (plug != sim.pub_plug) | (blk != sim.pub_blk)
                    | ~_same(sim.announced, sim.pub_ann) | ~_same(sim.parked_since, sim.pub_since)
                    | (consent != sim.pub_consent))
        continuous = ((np.abs(sim.soc - sim.pub_soc) >= pol.battery_delta)
                      | (np.abs(head - sim.pub_head) >= pol.thermal_delta_c)
                      | (np.abs(load - sim.pub_load) >= pol.load_delta))
        check = running & (~sim.pub_valid | discrete | continuous)
    published = np.zeros(f.n, dtype=bool)
    names = sim.region_names
    for i in np.flatnonzero(check).tolist():
        cand = view(sim, i, now_u, cur, names)
        last = view(sim, i, T0 + float(sim.pub_t[i]), old, names) if sim.pub_valid[i] else None
        why = should_publish(cast(CapacityRecord, last), cast(CapacityRecord, cand), now_u, pol)
        if why is not None and why != "refresh":
            published[i] = True
            sim.publish_reasons[why] = sim.publish_reasons.get(why, 0) + 1
    sim.calls["should_publish"] += int(check.sum())
    # Unchanged records refresh every refresh_s between samples (the node samples every second);
    # a refresh sends the current state.
    idle = running & ~published & sim.pub_valid
    n_ref = np.maximum(np.where(idle, np.floor((now - sim.pub_t) / pol.refresh_s), 0.0), 0.0)
    refreshed = n_ref > 0
    sim.pub_t = np.where(refreshed, sim.pub_t + n_ref * pol.refresh_s, sim.pub_t)
    sim.publish_reasons["refresh"] = sim.publish_reasons.get("refresh", 0) + int(n_ref.sum())
    sim.publish_reasons["goodbye"] = sim.publish_reasons.get("goodbye", 0) + int(stopped.sum())
    pubs = n_ref + published + stopped  # a node that leaves says goodbye (offline record)
    p = published | refreshed
    for dst, src in zip(old, cur, strict=True):
        dst[p] = src[p]
    sim.pub_valid |= published
    sim.pub_t[published] = now
    sim.pub_valid[stopped] = False
    # bytes: real signed record size + pubsub framing; each subscriber gets up to D copies
    size = sim.size_table[state * 4 + (blk >= 0) * 2 + ~np.isnan(sim.announced)]
    msg_bytes = pubs * (size + scn.pubsub_overhead_bytes)
    R = f.regions
    region_bytes = np.bincount(f.region, weights=msg_bytes, minlength=R)
    region_msgs = np.bincount(f.region, weights=pubs, minlength=R)
    subs = np.bincount(f.region, weights=running.astype(float), minlength=R)
    copies = np.minimum(scn.gossip_degree, np.maximum(subs - 1, 0))
    sim.hour_bytes += np.where(running, (region_bytes * copies)[f.region], 0.0)
    sim.hour_msgs += np.where(running, region_msgs[f.region], 0.0)
    sim.hour_run_s += np.where(running, dt, 0.0)
    sim.h["publishes"] += int(pubs.sum())


def view(sim: Simulation, i: int, issued_u: float, v: tuple[np.ndarray, ...],
         names: list[str]) -> _RecordView:
    """Car ``i``'s record fields from the arrays ``v`` (current or last published)."""
    state, plug, blk, ann, since, consent, soc, head, load = (a[i] for a in v)
    return _RecordView(
        STATES[state], bool(plug), bool(consent), None, "wifi", bool(sim.fleet.metered[i]),
        "sim", _blk(int(blk)), ("/ip4/203.0.113.7/tcp/4001",), names[sim.fleet.region[i]],
        None if math.isnan(ann) else T0 + float(ann), None if math.isnan(since) else T0 + float(since),
        float(soc), float(head), float(load), 12_000, issued_u)
