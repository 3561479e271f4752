"""Verified work, sans-IO: step commitments, row proofs, tolerances, adaptive checking, receipts,
credits and misbehaviour reports."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.protocols.errors import LocalProtocolError, RemoteProtocolError
from idlefleet.protocols.peerid import peer_id_from_public_key
from idlefleet.protocols.receipts import (
    CREDIT_FLOPS,
    MisbehaviourReport,
    Receipt,
    credits,
    decode_receipt,
    verify_report,
)
from idlefleet.protocols.tensors import encode_hidden
from idlefleet.protocols.verification import (
    TOLERANCE,
    RowProof,
    StepCommitment,
    TrustBook,
    row_digests,
    row_mismatch,
    rows_root,
)

KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in range(1, 6)]
IDS = [peer_id_from_public_key(k.public_key().public_bytes_raw()) for k in KEYS]
MODEL = "gguf-sha256:" + "ab" * 32


def commitment(server: int, x: np.ndarray, y: np.ndarray, *, position: int = 0, dtype: str = "float32",
               client: int = 0) -> tuple[StepCommitment, bytes, Any, Any]:
    tin, tout = encode_hidden(x, dtype), encode_hidden(y, dtype)
    c = StepCommitment(IDS[server], IDS[client], MODEL, 10, 20, 7, position, x.shape[0],
                       rows_root(row_digests(tin)), rows_root(row_digests(tout)))
    return c, c.sign(KEYS[server]), tin, tout


def proof(index: int, tin: Any, tout: Any) -> RowProof:
    from idlefleet.protocols.tensors import WIRE_DTYPES, EncodedTensor

    width = tout.shape[1] * WIRE_DTYPES[tout.dtype].itemsize
    row = EncodedTensor(tout.dtype, (1, tout.shape[1]), tout.data[index * width:(index + 1) * width],
                        tout.scales[4 * index:4 * index + 4] if tout.scales is not None else None)
    return RowProof(index, tuple(row_digests(tin)), tuple(row_digests(tout)), row)


def hidden(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 576)).astype(np.float32)


# --- digests and commitments ------------------------------------------------------------------------

def test_row_digests_are_per_row_and_cover_int8_scales() -> None:
    x = hidden(3)
    assert row_digests(encode_hidden(x[1:2])) == row_digests(encode_hidden(x))[1:2]
    a, b = encode_hidden(x, "int8"), encode_hidden(x * 2, "int8")  # same int8 levels, other scales
    assert a.data == b.data and row_digests(a) != row_digests(b)
    assert rows_root(row_digests(a)) != rows_root(row_digests(a)[::-1])


def test_commitment_round_trip_and_tampering() -> None:
    c, sig, _, _ = commitment(1, hidden(2), hidden(2, 1))
    c.verify(sig)
    decoded, got_sig = StepCommitment.decode(c.encode(sig))
    assert decoded == c and got_sig == sig
    for change in ({"position": 1}, {"tokens": 3}, {"output_root": b"\0" * 32}, {"client": IDS[2]}):
        with pytest.raises(RemoteProtocolError, match="bad signature"):
            dataclasses.replace(c, **change).verify(sig)
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        dataclasses.replace(c, server=IDS[2]).verify(sig)  # someone else's key


@pytest.mark.parametrize(
    "changes",
    [{"server": "not-a-peer"}, {"tokens": 0}, {"start": 20}, {"input_root": b"x"}, {"position": -1},
     {"model_id": ""}, {"session": True}],
)
def test_commitment_rejects_bad_fields(changes: dict[str, Any]) -> None:
    c, _, _, _ = commitment(1, hidden(1), hidden(1))
    with pytest.raises(LocalProtocolError):  # building our own: a local error
        dataclasses.replace(c, **changes)


def test_commitment_decode_rejects_garbage() -> None:
    c, sig, _, _ = commitment(1, hidden(1), hidden(1))
    for data in (b"", b"\x81\xa1x\x01", c.encode(sig)[:-3], c.encode(sig[:-1] + b"\0"), b"\xc4" * 2000):
        with pytest.raises(RemoteProtocolError):
            StepCommitment.decode(data)


# --- comparing outputs ------------------------------------------------------------------------------

def test_batched_and_incremental_agree_within_tolerance(model_file: Any) -> None:
    from idlefleet.node.model.stage import load_stage

    stage = load_stage(model_file, 10, 14)
    x = hidden(12) * 3
    cache = stage.new_cache()
    incremental = np.concatenate([stage.forward(x[i:i + 1], cache, i) for i in range(12)])
    window = stage.forward(x, stage.new_cache(), 0)
    assert row_mismatch(incremental, window).max() < TOLERANCE["float32"] / 5
    from idlefleet.protocols.tensors import TensorLimits, decode_hidden

    for dtype in ("float16", "int8"):  # both sides encode for the wire independently
        a = decode_hidden(encode_hidden(incremental, dtype), TensorLimits())
        b = decode_hidden(encode_hidden(window, dtype), TensorLimits())
        assert row_mismatch(a, b).max() < TOLERANCE[dtype] / 2, dtype
    # The faults a verifier must catch are far outside every tolerance.
    noise = np.random.default_rng(1).standard_normal(window.shape).astype(np.float32)
    noisy = window + 0.05 * np.abs(window).max(axis=1, keepdims=True) * noise
    assert row_mismatch(noisy, window).min() > TOLERANCE["int8"]
    assert row_mismatch(x, window).min() > TOLERANCE["int8"]  # "skip": the input handed back


def test_row_mismatch_needs_same_shapes() -> None:
    with pytest.raises(ValueError, match="cannot compare"):
        row_mismatch(hidden(2), hidden(3))


# --- adaptive checking ------------------------------------------------------------------------------

def test_trust_new_peer_always_checked_then_less_but_never_zero() -> None:
    book = TrustBook(new_windows=4, min_rate=0.1, seed=1)
    assert all(book.should_check("p") for _ in range(50))  # no valid window yet: always
    rates = []
    for _ in range(600):
        rates.append(book.rate("p"))
        book.valid("p")
    assert rates[:4] == [1.0] * 4
    assert all(a >= b for a, b in itertools.pairwise(rates))
    assert rates[-1] == pytest.approx(0.1)
    book.invalid("p")  # one mismatch: new again
    assert book.rate("p") == 1.0 and book.statistics("p") == {"streak": 0, "valid": 600, "invalid": 1}


def test_trust_sampling_follows_the_rate_deterministically() -> None:
    def run() -> list[bool]:
        book = TrustBook(new_windows=2, min_rate=0.25, seed=7)
        for _ in range(1000):
            book.valid("p")
        return [book.should_check("p") for _ in range(4000)]

    first = run()
    assert first == run()
    assert 0.2 < sum(first) / len(first) < 0.3


def test_trust_book_round_trips_and_forgets_the_least_recently_updated_peer() -> None:
    book = TrustBook(max_peers=3)
    for peer, windows in (("a", 9), ("b", 2), ("c", 5)):
        for _ in range(windows):
            book.valid(peer)
    book.invalid("b")  # b: new again (streak 0), and updated after c
    assert book.changed
    book.valid("a")  # a: the most recently updated, so d pushes c out, the least recent one
    book.valid("d")
    assert book.to_json() == {"version": 1, "peers": [["b", 0, 2, 1], ["a", 10, 10, 0], ["d", 1, 1, 0]]}
    again = TrustBook()
    assert again.load(book.to_json()) == 3 and not again.changed
    assert again.statistics("a") == {"streak": 10, "valid": 10, "invalid": 0}
    assert again.rate("a") == book.rate("a") and again.rate("b") == 1.0
    small = TrustBook(max_peers=2)
    small.load(book.to_json())  # the most recently updated ones are kept
    assert [p for p, *_ in small.to_json()["peers"]] == ["a", "d"]


@pytest.mark.parametrize("data", [
    None, [], {"version": 2, "peers": []}, {"version": 1}, {"version": 1, "peers": {}},
    {"version": 1, "peers": [], "extra": 1}, {"version": 1, "peers": [["p", 1, 1]]},
    {"version": 1, "peers": [["p", 2, 1, 0]]},  # a streak longer than the valid windows
    {"version": 1, "peers": [["p", -1, 1, 0]]}, {"version": 1, "peers": [["p", 1.0, 1, 0]]},
    {"version": 1, "peers": [["p", True, 1, 0]]}, {"version": 1, "peers": [["", 1, 1, 0]]},
    {"version": 1, "peers": [["p" * 129, 1, 1, 0]]}, {"version": 1, "peers": [[7, 1, 1, 0]]},
    {"version": 1, "peers": [["p", 1, 1 << 60, 0]]},
])
def test_a_malformed_trust_book_is_refused_and_changes_nothing(data: Any) -> None:
    book = TrustBook()
    for _ in range(10):
        book.valid("known")
    before = book.to_json()
    with pytest.raises(ValueError, match=r"trust book|keys|peers"):
        book.load(data)
    assert book.to_json() == before


# --- receipts and credits ---------------------------------------------------------------------------

def receipt(**changes: Any) -> Receipt:
    fields: dict[str, Any] = dict(
        server=IDS[1], client=IDS[0], model_id=MODEL, start=10, end=20, session=3, opened_at=1700000000.0,
        closed_at=1700000060.0, tokens=100, block_steps=1000, flops=7.1e9, verified=90, unverified=6,
        rejected=4)
    fields.update(changes)
    return Receipt(**fields)


def test_receipt_signed_by_both_round_trips() -> None:
    r = receipt()
    data = r.encode(r.sign(KEYS[1]), r.sign(KEYS[0]))
    assert decode_receipt(data) == r
    with pytest.raises(RemoteProtocolError, match="server"):
        decode_receipt(r.encode(r.sign(KEYS[0]), r.sign(KEYS[0])))
    with pytest.raises(RemoteProtocolError, match="client"):
        decode_receipt(r.encode(r.sign(KEYS[1]), r.sign(KEYS[2])))


@pytest.mark.parametrize(
    "changes",
    [{"verified": 91}, {"block_steps": 999}, {"closed_at": 1.0}, {"flops": float("nan")}, {"client": IDS[1]},
     {"tokens": -1}, {"end": 10}],
)
def test_receipt_rejects_inconsistent_counts(changes: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):  # building our own: a local error
        receipt(**changes)


def test_credits_are_verified_flops_in_cobblestones() -> None:
    r = receipt(flops=CREDIT_FLOPS * 100)
    assert credits(r) == pytest.approx({"verified": 90.0, "unverified": 6.0, "rejected": 4.0})


# --- misbehaviour reports ---------------------------------------------------------------------------

def make_report(*, accused_noise: float = 0.5, witness_noise: float = 0.0, witness_input_seed: int = 0,
                position: int = 5, dtype: str = "float32") -> bytes:
    """Accused (host 1) decoded position 5 alone; host 2 and the referee (host 3) re-ran the window
    [3, 7) as one prefill. The reporter is the client, host 0."""
    x = hidden(4, seed=0)
    y = hidden(4, seed=9)
    bad = y[2:3] + accused_noise * np.abs(y[2:3]).max()
    acc, acc_sig, acc_in, acc_out = commitment(1, x[2:3], bad, position=5, dtype=dtype)
    w1, w1_sig, w1_in, w1_out = commitment(2, x, y, position=3, dtype=dtype)
    x2 = x if witness_input_seed == 0 else hidden(4, seed=witness_input_seed)
    y2 = y + witness_noise * np.abs(y).max()
    w2, w2_sig, w2_in, w2_out = commitment(3, x2, y2, position=3, dtype=dtype)
    proofs = (proof(position - 5, acc_in, acc_out), proof(position - 3, w1_in, w1_out),
              proof(position - 3, w2_in, w2_out))
    report = MisbehaviourReport(IDS[0], position, acc.encode(acc_sig), (w1.encode(w1_sig), w2.encode(w2_sig)),
                                proofs)
    return report.encode(KEYS[0])


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_report_names_the_accused(dtype: str) -> None:
    report, accused = verify_report(make_report(dtype=dtype))
    assert accused == IDS[1] and report.reporter == IDS[0] and report.position == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accused_noise": 0.0}, "within tolerance"),
        ({"witness_noise": 0.3}, "witnesses disagree"),
        ({"witness_input_seed": 4}, "different inputs"),
    ],
)
def test_report_refuses_evidence_that_does_not_prove_it(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        verify_report(make_report(**kwargs))


def test_report_signature_and_garbage() -> None:
    data = make_report()
    with pytest.raises(RemoteProtocolError):
        verify_report(data[:-5])
    with pytest.raises(RemoteProtocolError):
        verify_report(data.replace(IDS[0].encode(), IDS[4].encode()))  # reporter swapped: sig fails
    with pytest.raises(RemoteProtocolError):
        verify_report(b"\x92\x01\x02")


def test_work_tally_moves_tokens_between_outcomes() -> None:
    from idlefleet.protocols.receipts import WorkTally

    t = WorkTally()
    t.add(10)
    t.verify(4)
    assert (t.tokens, t.verified, t.unverified, t.rejected) == (10, 4, 6, 0)
    t.verify(100)  # never more than is unverified
    assert (t.verified, t.unverified) == (10, 0)
    t.add(5)
    t.reject()  # what was not verified yet is rejected; verified work stays verified
    assert (t.verified, t.unverified, t.rejected) == (10, 0, 5)
