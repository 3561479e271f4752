"""Work receipts, credits and misbehaviour reports, sans-IO.

**Receipt.** When a session closes, client and server both sign one receipt: who served whom, which
model blocks, how many tokens and block-steps, the estimated FLOPs, and how many of those tokens the
client verified, left unverified, or rejected. Wire form ``{"body": bin, "server_sig": bin(64),
"client_sig": bin(64)}``, each signature Ed25519 over ``RECEIPT_DOMAIN || body`` by that party's key
(derived from its peer id), so a third party can check a receipt from the bytes alone.

**Credits** are verified work. The unit is BOINC's cobblestone: 200 credits per day of a 1 GFLOPS
machine, i.e. one credit = 4.32e11 floating-point operations. Reusing the volunteer-computing unit
keeps an owner's numbers comparable with two decades of public BOINC statistics; only the verified
fraction of a receipt's FLOPs earns credit.

**The exchange.** When a client closes a hop session it proposes the receipt (its own signature over
the body, :func:`propose`); the stage server checks the proposal against its own account of the
session (:class:`SessionWork`, :func:`check_proposal`: parties, model, blocks, session number,
tokens, FLOPs, times within ``RECEIPT_SKEW_S``; it cannot judge ``verified``/``rejected``, which
are the client's verdict), countersigns, stores and returns it; the client checks the countersigned
receipt (:func:`check_countersigned`) and stores it. PROTOCOL.md 6.3 and 7.3.

**Misbehaviour report.** A client that caught a server returning a wrong row (see
:mod:`idlefleet.protocols.verification`) gossips the evidence: the accused's signed step commitment,
two other hosts' commitments for the same inputs (the second host and the referee), and a
:class:`~idlefleet.protocols.verification.RowProof` from each for the disputed position. Any node
checks every signature, that the three committed to the same input row, and that the accused's row
differs from both witnesses beyond the dtype's tolerance while the witnesses agree — then lowers
the accused in its own routing. The report is signed by the reporter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from idlefleet.protocols import session as S
from idlefleet.protocols import wire
from idlefleet.protocols.errors import LocalProtocolError, RemoteProtocolError, peer_input
from idlefleet.protocols.peerid import public_key_from_peer_id
from idlefleet.protocols.tensors import TensorLimits, decode_hidden
from idlefleet.protocols.verification import TOLERANCE, RowProof, StepCommitment, row_mismatch

__all__ = [
    "CREDIT_FLOPS",
    "RECEIPT_DOMAIN",
    "RECEIPT_SKEW_S",
    "REPORT_DOMAIN",
    "MisbehaviourReport",
    "Receipt",
    "ReceiptRefused",
    "SessionWork",
    "WorkTally",
    "check_countersigned",
    "check_proposal",
    "credits",
    "decode_receipt",
    "flops_per_token_block",
    "propose",
    "verify_report",
]

RECEIPT_DOMAIN = b"idlefleet/receipt/v1\x00"
REPORT_DOMAIN = b"idlefleet/misbehaviour/v1\x00"
RECEIPT_VERSION = REPORT_VERSION = 1
MAX_RECEIPT_SIZE = 2048
MAX_REPORT_SIZE = 64 * 1024

#: FLOPs per credit: 200 credits/day at 1 GFLOPS (BOINC's cobblestone) = 86400 * 1e9 / 200.
CREDIT_FLOPS = 4.32e11


def _verify_sig(peer_id: str, domain: bytes, body: bytes, sig: object, what: str) -> None:
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise RemoteProtocolError(f"{what}: signature must be 64 bytes")
    key = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))
    try:
        key.verify(sig, domain + body)
    except InvalidSignature:
        raise RemoteProtocolError(f"{what}: bad signature") from None


@dataclass(frozen=True)
class Receipt:
    """One session's work (fields in wire order). Token counts: ``verified + unverified + rejected
    == tokens``; ``block_steps = tokens * (end - start)``. Construction checks every field
    (LocalProtocolError); :meth:`from_body`, reading a peer's, raises RemoteProtocolError."""

    server: str
    client: str
    model_id: str
    start: int
    end: int
    session: int
    opened_at: float
    closed_at: float
    tokens: int
    block_steps: int
    flops: float
    verified: int
    unverified: int
    rejected: int

    def __post_init__(self) -> None:
        for name in ("server", "client"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise LocalProtocolError(f"receipt: {name} must be a peer id")
            try:
                public_key_from_peer_id(value)
            except RemoteProtocolError as e:  # the check is peerid's; the receipt is ours
                raise LocalProtocolError(str(e)) from e
        if self.server == self.client:
            raise LocalProtocolError("receipt: server and client must differ")
        if not isinstance(self.model_id, str) or not 0 < len(self.model_id) <= 128:
            raise LocalProtocolError("receipt: model_id must be 1..128 chars")
        for name in ("start", "end", "session", "tokens", "block_steps", "verified", "unverified",
                     "rejected"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 2**63:
                raise LocalProtocolError(f"receipt: {name} must be an int in 0..2^63-1")
        for name in ("opened_at", "closed_at", "flops"):
            value = getattr(self, name)
            if not isinstance(value, float) or not math.isfinite(value) or value < 0:
                raise LocalProtocolError(f"receipt: {name} must be a finite non-negative float")
        if not self.start < self.end:
            raise LocalProtocolError("receipt: needs start < end")
        if self.closed_at < self.opened_at:
            raise LocalProtocolError("receipt: closed before it opened")
        if self.verified + self.unverified + self.rejected != self.tokens:
            raise LocalProtocolError("receipt: verified + unverified + rejected != tokens")
        if self.block_steps != self.tokens * (self.end - self.start):
            raise LocalProtocolError("receipt: block_steps != tokens * blocks")

    def body(self) -> bytes:
        return wire.pack({"v": RECEIPT_VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}})

    def sign(self, key: Ed25519PrivateKey) -> bytes:
        return key.sign(RECEIPT_DOMAIN + self.body())

    def encode(self, server_sig: bytes, client_sig: bytes) -> bytes:
        return wire.pack({"body": self.body(), "server_sig": server_sig, "client_sig": client_sig})

    def verify(self, *, server_sig: bytes | None = None, client_sig: bytes | None = None) -> None:
        """Check whichever signatures are given; raise RemoteProtocolError on a bad one."""
        body = self.body()
        if server_sig is not None:
            _verify_sig(self.server, RECEIPT_DOMAIN, body, server_sig, "receipt (server)")
        if client_sig is not None:
            _verify_sig(self.client, RECEIPT_DOMAIN, body, client_sig, "receipt (client)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_body(cls, body: bytes) -> Receipt:
        """Parse a peer's receipt body (signatures unchecked); raises RemoteProtocolError."""
        obj = wire.unpack(body, what="receipt body")
        names = [f.name for f in fields(cls)]
        if not isinstance(obj, dict) or obj.get("v") != RECEIPT_VERSION or set(obj) != {"v", *names}:
            raise RemoteProtocolError("receipt: unknown version or wrong fields")
        with peer_input():
            receipt = cls(**{name: obj[name] for name in names})
        if receipt.body() != body:
            raise RemoteProtocolError("receipt: body not in canonical form")
        return receipt


def decode_receipt(data: bytes) -> Receipt:
    """Parse a receipt signed by both parties; raise RemoteProtocolError unless both signatures hold."""
    if not isinstance(data, bytes) or len(data) > MAX_RECEIPT_SIZE:
        raise RemoteProtocolError(f"receipt: not bytes or over {MAX_RECEIPT_SIZE} bytes")
    outer = wire.unpack(data, what="receipt")
    if not isinstance(outer, dict) or set(outer) != {"body", "server_sig", "client_sig"}:
        raise RemoteProtocolError("receipt: needs exactly body, server_sig and client_sig")
    if not isinstance(outer["body"], bytes):
        raise RemoteProtocolError("receipt: body must be bin")
    receipt = Receipt.from_body(outer["body"])
    receipt.verify(server_sig=outer["server_sig"], client_sig=outer["client_sig"])
    return receipt


def credits(receipt: Receipt) -> dict[str, float]:
    """The receipt's FLOPs split by verification outcome, in credits (``CREDIT_FLOPS`` each).
    Only ``verified`` is earned credit."""
    per_token = receipt.flops / receipt.tokens / CREDIT_FLOPS if receipt.tokens else 0.0
    return {"verified": receipt.verified * per_token, "unverified": receipt.unverified * per_token,
            "rejected": receipt.rejected * per_token}


# --- the exchange when a hop session closes -------------------------------------------------------

#: How far a proposal's ``opened_at`` / ``closed_at`` may be from the server's own clock (seconds):
#: the clock skew records tolerate (PROTOCOL.md 3.4).
RECEIPT_SKEW_S = 30.0


def flops_per_token_block(hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int,
                          ffn_size: int) -> float:
    """Estimated FLOPs of one llama block for one token: 2 per multiply-add of its weight matrices,
    Q and O (``hidden x n_heads*head_dim`` each), K and V (``hidden x n_kv_heads*head_dim`` each),
    gate, up and down (``hidden x ffn`` each). Attention over the cached positions
    (``4 x n_heads x head_dim`` per cached position) and the norms are left out: they depend on the
    context, which neither side can prove, and are a few percent at the lengths served.
    SmolLM2-135M: 7,077,888."""
    q = hidden_size * n_heads * head_dim
    kv = hidden_size * n_kv_heads * head_dim
    return float(2 * (2 * q + 2 * kv + 3 * hidden_size * ffn_size))


class ReceiptRefused(RemoteProtocolError):
    """Remote only: a stage server refuses a client's receipt proposal (``check_proposal``);
    ``code`` is the ``error`` code it replies with (``bad_receipt`` or ``receipt_mismatch``,
    ``protocols.session``)."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        super().__init__(f"{code}: {detail}")


@dataclass(frozen=True)
class SessionWork:
    """A stage server's own account of one session: what a receipt proposal must match."""

    server: str  # this server's peer id
    client: str  # the peer that opened the session (authenticated by the secure channel)
    model_id: str
    start: int
    end: int
    session: int
    opened_at: float  # the server's clock
    tokens: int  # positions computed and answered in the session
    flops_per_token_block: float


def propose(receipt: Receipt, key: Ed25519PrivateKey) -> dict[str, Any]:
    """The client's ``receipt_proposal`` body: the receipt body and the client's signature."""
    return {"body": receipt.body(), "client_sig": receipt.sign(key)}


def check_proposal(body: dict[str, Any], work: SessionWork, now: float, *,
                   skew_s: float = RECEIPT_SKEW_S) -> tuple[Receipt, bytes]:
    """The server's decision on a ``receipt_proposal`` body, pure. Returns the receipt and the
    client's signature; raises ReceiptRefused with ``bad_receipt`` (wrong fields or sizes, a body
    that is not a valid canonical receipt, another server or client, a bad client signature) or
    ``receipt_mismatch`` (model, blocks, session, tokens, FLOPs or times differ from ``work``, or
    the session computed nothing). Checks run in that order; the signature before any count."""
    if not isinstance(body, dict) or set(body) != {"body", "client_sig"}:
        raise ReceiptRefused(S.ERR_BAD_RECEIPT, "receipt_proposal needs exactly body and client_sig")
    raw, sig = body["body"], body["client_sig"]
    if not isinstance(raw, bytes) or len(raw) > MAX_RECEIPT_SIZE:
        raise ReceiptRefused(S.ERR_BAD_RECEIPT, f"body must be bin of at most {MAX_RECEIPT_SIZE} bytes")
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise ReceiptRefused(S.ERR_BAD_RECEIPT, "client_sig must be 64 bytes")
    try:
        receipt = Receipt.from_body(raw)
    except RemoteProtocolError as e:
        raise ReceiptRefused(S.ERR_BAD_RECEIPT, str(e)) from None
    if receipt.server != work.server or receipt.client != work.client:
        raise ReceiptRefused(S.ERR_BAD_RECEIPT, "the receipt names another server or client than "
                             "the two ends of this session")
    try:
        receipt.verify(client_sig=sig)
    except RemoteProtocolError as e:
        raise ReceiptRefused(S.ERR_BAD_RECEIPT, str(e)) from None
    ours = (work.model_id, work.start, work.end, work.session)
    theirs = (receipt.model_id, receipt.start, receipt.end, receipt.session)
    if theirs != ours:
        raise ReceiptRefused(S.ERR_RECEIPT_MISMATCH, f"model, blocks or session {theirs} != {ours}")
    if work.tokens == 0:
        raise ReceiptRefused(S.ERR_RECEIPT_MISMATCH, "this session computed nothing: no receipt")
    if receipt.tokens != work.tokens:
        raise ReceiptRefused(S.ERR_RECEIPT_MISMATCH,
                             f"tokens {receipt.tokens}, this server computed {work.tokens}")
    flops = work.flops_per_token_block * receipt.block_steps
    if not math.isclose(receipt.flops, flops, rel_tol=1e-9):
        raise ReceiptRefused(S.ERR_RECEIPT_MISMATCH, f"flops {receipt.flops!r}, expected {flops!r}")
    if abs(receipt.opened_at - work.opened_at) > skew_s or abs(receipt.closed_at - now) > skew_s:
        raise ReceiptRefused(S.ERR_RECEIPT_MISMATCH, f"opened_at/closed_at more than {skew_s:g}s "
                             "from this server's clock")
    return receipt, sig


def check_countersigned(data: object, proposed: Receipt) -> Receipt:
    """The client's check of a server's ``receipt`` reply: both signatures hold and the body is
    exactly the one proposed. Raises RemoteProtocolError."""
    if not isinstance(data, bytes):
        raise RemoteProtocolError("receipt: must be bin")
    receipt = decode_receipt(data)
    if receipt != proposed:
        raise RemoteProtocolError("receipt: the server countersigned another body than the proposal")
    return receipt


@dataclass
class WorkTally:
    """One hop session's work as the client counts it, for that session's receipt. ``tokens`` counts
    every position the server computed in the session (prefill, decode and failover replays).
    The verifier moves tokens from unverified to ``verified`` as windows check out, and
    :meth:`reject` marks everything not yet verified as rejected when the server is caught."""

    tokens: int = 0
    verified: int = 0
    rejected: int = 0

    @property
    def unverified(self) -> int:
        return self.tokens - self.verified - self.rejected

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def verify(self, tokens: int) -> None:
        self.verified += max(0, min(tokens, self.unverified))

    def reject(self) -> None:
        self.rejected += self.unverified


# --- misbehaviour reports -----------------------------------------------------------------------------

@dataclass(frozen=True)
class MisbehaviourReport:
    """Evidence that ``accused`` returned a wrong row at ``position``."""

    reporter: str
    position: int
    accused: bytes  # StepCommitment wire form
    witnesses: tuple[bytes, bytes]  # the second host's and the referee's commitments
    proofs: tuple[RowProof, RowProof, RowProof]  # accused, witness 1, witness 2

    def body(self) -> bytes:
        return wire.pack({"v": REPORT_VERSION, "reporter": self.reporter, "position": self.position,
                          "accused": self.accused, "witnesses": list(self.witnesses),
                          "proofs": [p.to_dict() for p in self.proofs]})

    def encode(self, key: Ed25519PrivateKey) -> bytes:
        body = self.body()
        return wire.pack({"body": body, "sig": key.sign(REPORT_DOMAIN + body)})


def verify_report(data: bytes, *, limits: TensorLimits | None = None) -> tuple[MisbehaviourReport, str]:
    """Check a report completely; return it and the accused peer id. Raises RemoteProtocolError."""
    if not isinstance(data, bytes) or len(data) > MAX_REPORT_SIZE:
        raise RemoteProtocolError(f"misbehaviour report: not bytes or over {MAX_REPORT_SIZE} bytes")
    outer = wire.unpack(data, what="misbehaviour report")
    if not (isinstance(outer, dict) and set(outer) == {"body", "sig"} and isinstance(outer["body"], bytes)):
        raise RemoteProtocolError("misbehaviour report: needs exactly body (bin) and sig")
    body = wire.unpack(outer["body"], what="misbehaviour report body")
    keys = {"v", "reporter", "position", "accused", "witnesses", "proofs"}
    if not isinstance(body, dict) or body.get("v") != REPORT_VERSION or set(body) != keys:
        raise RemoteProtocolError("misbehaviour report: unknown version or wrong fields")
    reporter, position = body["reporter"], body["position"]
    witnesses, proofs = body["witnesses"], body["proofs"]
    if not isinstance(reporter, str) or type(position) is not int or position < 0:
        raise RemoteProtocolError("misbehaviour report: bad reporter or position")
    if not (isinstance(witnesses, list) and len(witnesses) == 2 and isinstance(proofs, list)
            and len(proofs) == 3):
        raise RemoteProtocolError("misbehaviour report: needs 2 witnesses and 3 proofs")
    _verify_sig(reporter, REPORT_DOMAIN, outer["body"], outer["sig"], "misbehaviour report")

    commitments = [StepCommitment.decode(c)[0] for c in (body["accused"], *witnesses)]
    row_proofs = [RowProof.from_dict(p) for p in proofs]
    accused = commitments[0]
    if len({c.server for c in commitments}) != 3:
        raise RemoteProtocolError("misbehaviour report: accused and witnesses must be three different hosts")
    rows = []
    for c, proof in zip(commitments, row_proofs, strict=True):
        if (c.model_id, c.start, c.end, c.client) != (accused.model_id, accused.start, accused.end, reporter):
            raise RemoteProtocolError("misbehaviour report: commitments differ in model, blocks or client")
        if proof.index != position - c.position:
            raise RemoteProtocolError("misbehaviour report: a proof is not for the disputed position")
        proof.check(c)
        rows.append((proof, decode_hidden(proof.row, limits or TensorLimits())))
    inputs = {proof.input_digests[proof.index] for proof, _ in rows}
    if len(inputs) != 1:
        raise RemoteProtocolError("misbehaviour report: the hosts were given different inputs")
    (_, bad), (p1, w1), (_, w2) = rows
    tolerance = TOLERANCE[p1.row.dtype]
    if float(row_mismatch(w1, w2)[0]) > tolerance:
        raise RemoteProtocolError("misbehaviour report: the witnesses disagree with each other")
    if min(float(row_mismatch(bad, w1)[0]), float(row_mismatch(bad, w2)[0])) <= tolerance:
        raise RemoteProtocolError("misbehaviour report: the accused's row is within tolerance")
    report = MisbehaviourReport(reporter, position, body["accused"], (witnesses[0], witnesses[1]),
                                (row_proofs[0], row_proofs[1], row_proofs[2]))
    return report, accused.server
