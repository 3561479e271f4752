"""Verified work, sans-IO: what a stage server commits to, how outputs are compared, how much to check.

A stage server signs what it returns. For every step it computes a **step commitment**: "I, *server*,
ran blocks ``[start, end)`` of *model_id* for *client*'s session *session* at positions
``position .. position + tokens - 1`` on inputs whose rows hash to *input_root* and returned outputs
whose rows hash to *output_root*", signed with its Ed25519 key. The client rebuilds the same body
from what it sent and received and checks the signature, so a wrong output is evidence anyone can
verify: a third party needs only the commitments and the rows in question (:class:`RowProof`).

Rows are hashed one by one (:func:`row_digests`) and the list is hashed into a root
(:func:`rows_root`), so one row of a long prefill can be proven against the root without shipping
the others.

Two honest hosts do not produce identical bits: a window re-run as one prefill on a verifier and
the same positions decoded one at a time on the primary differ in the last bits (batched vs
incremental matmuls), and fp16/int8 wire encodings round. Outputs are therefore compared per row by
the largest absolute difference relative to the row's largest magnitude, against a tolerance that
fits the wire dtype (:data:`TOLERANCE`; measured numbers in docs/PROTOCOL.md).

How often to check is BOINC's adaptive replication (:class:`TrustBook`): a peer new to this client
is always checked; each consecutive valid window lowers the rate, never below ``min_rate``; one
mismatch resets the peer to "new". The client (``node/client/verifier.py``) draws once per hop session,
the unit of work: a sampled session has every window checked.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from idlefleet.protocols import wire
from idlefleet.protocols.errors import LocalProtocolError, RemoteProtocolError, peer_input
from idlefleet.protocols.peerid import public_key_from_peer_id
from idlefleet.protocols.tensors import INT8, WIRE_DTYPES, EncodedTensor

__all__ = [
    "COMMITMENT_DOMAIN",
    "TOLERANCE",
    "TRUST_FILE_VERSION",
    "RowProof",
    "StepCommitment",
    "TrustBook",
    "row_digests",
    "row_mismatch",
    "rows_root",
]

COMMITMENT_DOMAIN = b"idlefleet/step-commitment/v1\x00"
ROW_DOMAIN = b"idlefleet/row/v1\x00"
ROOT_DOMAIN = b"idlefleet/rows/v1\x00"
COMMITMENT_VERSION = 1
MAX_COMMITMENT_SIZE = 1024

#: Largest accepted per-row relative difference (max |a - b| / max |b|) between two honest hosts'
#: outputs for the same inputs, by wire dtype. Measured on SmolLM2-135M (10-block stages, 32
#: positions): fp32 batched vs incremental <= 7e-6; an fp16 round trip <= 4.5e-4; int8 <= 3.9e-3
#: (half a step of 127 levels). Each tolerance leaves >= 5x margin over two honest encodings.
TOLERANCE: dict[str, float] = {"float32": 1e-4, "float16": 3e-3, "int8": 2.5e-2}


def _row_bytes(t: EncodedTensor) -> list[bytes]:
    rows, hidden = t.shape
    width = hidden * WIRE_DTYPES[t.dtype].itemsize
    out = []
    for i in range(rows):
        row = t.data[i * width:(i + 1) * width]
        if t.dtype == INT8 and t.scales is not None:  # EncodedTensor requires scales for int8
            row += t.scales[4 * i:4 * i + 4]
        out.append(row)
    return out


def row_digests(t: EncodedTensor) -> list[bytes]:
    """SHA-256 of each row as it travels: ``ROW_DOMAIN || dtype || 00 || row bytes [|| scale]``."""
    prefix = ROW_DOMAIN + t.dtype.encode() + b"\x00"
    return [hashlib.sha256(prefix + row).digest() for row in _row_bytes(t)]


def rows_root(digests: Sequence[bytes]) -> bytes:
    """SHA-256 of ``ROOT_DOMAIN`` followed by the row digests in order (a one-level hash list)."""
    h = hashlib.sha256(ROOT_DOMAIN)
    for d in digests:
        h.update(d)
    return h.digest()


@functools.lru_cache(maxsize=4096)
def _public_key(peer_id: str) -> Ed25519PublicKey:
    """The Ed25519 key of ``peer_id``, cached: a client checks every step's commitment, always
    from the same few peers. Raises RemoteProtocolError for anything but an Ed25519 peer id."""
    return Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))


def _check_peer(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise LocalProtocolError(f"step commitment: {what} must be a peer id string")
    try:
        _public_key(value)
    except RemoteProtocolError as e:  # the check is peerid's; the commitment is ours
        raise LocalProtocolError(str(e)) from e
    return value


@dataclass(frozen=True)
class StepCommitment:
    """What a server signs for one step (fields in wire order). Construction checks every field
    (LocalProtocolError: a server signing its own, a client rebuilding one); :meth:`decode`, reading
    a peer's, raises RemoteProtocolError."""

    server: str
    client: str
    model_id: str
    start: int
    end: int
    session: int
    position: int
    tokens: int
    input_root: bytes
    output_root: bytes

    def __post_init__(self) -> None:
        _check_peer(self.server, "server")
        _check_peer(self.client, "client")
        if not isinstance(self.model_id, str) or not 0 < len(self.model_id) <= 128:
            raise LocalProtocolError("step commitment: model_id must be 1..128 chars")
        for name in ("start", "end", "session", "position", "tokens"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 2**63:
                raise LocalProtocolError(f"step commitment: {name} must be an int in 0..2^63-1")
        if not self.start < self.end or self.tokens < 1:
            raise LocalProtocolError("step commitment: needs start < end and tokens >= 1")
        for name in ("input_root", "output_root"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 32:
                raise LocalProtocolError(f"step commitment: {name} must be 32 bytes")

    def body(self) -> bytes:
        """The canonical body bytes (our strict msgpack, fields in order, shortest forms)."""
        return wire.pack({"v": COMMITMENT_VERSION, "server": self.server, "client": self.client,
                          "model_id": self.model_id, "start": self.start, "end": self.end,
                          "session": self.session, "position": self.position, "tokens": self.tokens,
                          "input_root": self.input_root, "output_root": self.output_root})

    def sign(self, key: Ed25519PrivateKey) -> bytes:
        """The server's 64-byte signature over ``COMMITMENT_DOMAIN || body``."""
        return key.sign(COMMITMENT_DOMAIN + self.body())

    def verify(self, sig: bytes) -> None:
        """Raise RemoteProtocolError unless ``sig`` is ``server``'s signature over this commitment."""
        if not isinstance(sig, bytes) or len(sig) != 64:
            raise RemoteProtocolError("step commitment: signature must be 64 bytes")
        try:
            _public_key(self.server).verify(sig, COMMITMENT_DOMAIN + self.body())
        except InvalidSignature:
            raise RemoteProtocolError("step commitment: bad signature") from None

    def encode(self, sig: bytes) -> bytes:
        """Wire form for reports: ``{"body": bin, "sig": bin(64)}``."""
        return wire.pack({"body": self.body(), "sig": sig})

    @classmethod
    def decode(cls, data: bytes) -> tuple[StepCommitment, bytes]:
        """Parse and verify a peer's wire form; returns the commitment and its signature. Raises
        RemoteProtocolError."""
        if not isinstance(data, bytes) or len(data) > MAX_COMMITMENT_SIZE:
            raise RemoteProtocolError("step commitment: not bytes or over 1024 bytes")
        outer = wire.unpack(data, what="step commitment")
        if not isinstance(outer, dict) or set(outer) != {"body", "sig"}:
            raise RemoteProtocolError("step commitment: needs exactly body and sig")
        body, sig = outer["body"], outer["sig"]
        if not isinstance(body, bytes):
            raise RemoteProtocolError("step commitment: body must be bin")
        fields = wire.unpack(body, what="step commitment body")
        if not isinstance(fields, dict) or fields.get("v") != COMMITMENT_VERSION:
            raise RemoteProtocolError("step commitment: unknown version")
        names = [f.name for f in cls.__dataclass_fields__.values()]
        if set(fields) != {"v", *names}:
            raise RemoteProtocolError("step commitment: wrong fields")
        with peer_input():
            commitment = cls(**{name: fields[name] for name in names})
        if commitment.body() != body:
            raise RemoteProtocolError("step commitment: body not in canonical form")
        commitment.verify(sig)
        return commitment, sig


def row_mismatch(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Per-row relative difference ``max |a - b| / max(max |b|, 1e-6)`` of two ``[T, H]`` outputs."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"cannot compare shapes {a.shape} and {b.shape}")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).max(axis=1)
    scale = np.maximum(np.abs(b.astype(np.float64)).max(axis=1), 1e-6)
    out: npt.NDArray[np.float64] = diff / scale
    return out


@dataclass(frozen=True)
class RowProof:
    """One output row of a commitment, with the row digests that tie it to the commitment's roots."""

    index: int  # row within the commitment (position = commitment.position + index)
    input_digests: tuple[bytes, ...]
    output_digests: tuple[bytes, ...]
    row: EncodedTensor  # shape [1, hidden]: the output row as the server sent it

    def check(self, commitment: StepCommitment) -> None:
        """Raise RemoteProtocolError unless the digests hash to the commitment's roots and ``row``
        is the committed output row ``index``."""
        n = commitment.tokens
        if not 0 <= self.index < n or len(self.input_digests) != n or len(self.output_digests) != n:
            raise RemoteProtocolError("row proof: index or digest count does not fit the commitment")
        if rows_root(self.input_digests) != commitment.input_root:
            raise RemoteProtocolError("row proof: input digests do not match the input root")
        if rows_root(self.output_digests) != commitment.output_root:
            raise RemoteProtocolError("row proof: output digests do not match the output root")
        if self.row.shape[0] != 1 or row_digests(self.row)[0] != self.output_digests[self.index]:
            raise RemoteProtocolError("row proof: the row is not the committed one")

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "inputs": list(self.input_digests), "outputs": list(self.output_digests),
                "row": self.row.to_dict()}

    @classmethod
    def from_dict(cls, obj: object) -> RowProof:
        if not isinstance(obj, dict) or set(obj) != {"index", "inputs", "outputs", "row"}:
            raise RemoteProtocolError("row proof: needs index, inputs, outputs, row")
        index, inputs, outputs = obj["index"], obj["inputs"], obj["outputs"]
        if type(index) is not int or not isinstance(inputs, list) or not isinstance(outputs, list):
            raise RemoteProtocolError("row proof: bad field types")
        if not all(isinstance(d, bytes) and len(d) == 32 for d in (*inputs, *outputs)):
            raise RemoteProtocolError("row proof: digests must be 32 bytes each")
        row = EncodedTensor.from_dict(obj["row"])  # RemoteTensorError
        return cls(index, tuple(inputs), tuple(outputs), row)


# --- how often to check: BOINC-style adaptive replication -------------------------------------------

#: The trust book's file format (:meth:`TrustBook.to_json`), how many peers it remembers, and bounds
#: on what a loaded one may hold.
TRUST_FILE_VERSION = 1
MAX_TRUSTED_PEERS = 4096
MAX_PEER_ID_CHARS = 128
MAX_COUNT = 1 << 53


@dataclass
class _Trust:
    streak: int = 0  # consecutive valid windows since the last mismatch (or since we met)
    valid: int = 0
    invalid: int = 0


@dataclass
class TrustBook:
    """Per-peer verification rate. A peer is always checked until it has ``new_windows``
    consecutive valid windows; then with probability ``max(min_rate, sqrt(new_windows / streak))``
    per draw (the client draws once per hop session) — falling as its run of valid results grows,
    never to zero. One mismatch resets it to new. Deterministic for a given ``seed``.

    It remembers at most ``max_peers`` peers (the least recently updated one is forgotten first:
    it is new again). :meth:`to_json` / :meth:`load` carry it across runs (``changed`` says whether
    there is anything new to save)."""

    new_windows: int = 4
    min_rate: float = 0.1
    seed: int | None = None
    max_peers: int = MAX_TRUSTED_PEERS
    changed: bool = False
    _peers: dict[str, _Trust] = field(default_factory=dict)  # least recently updated first
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if type(self.new_windows) is not int or self.new_windows < 1:
            raise ValueError("new_windows must be a positive int")
        if not 0 < self.min_rate <= 1:
            raise ValueError("min_rate must be in (0, 1]")
        if type(self.max_peers) is not int or self.max_peers < 1:
            raise ValueError("max_peers must be a positive int")
        self._rng = random.Random(self.seed)

    def __len__(self) -> int:
        return len(self._peers)

    def _update(self, peer: str) -> _Trust:
        t = self._peers.pop(peer, None) or _Trust()
        self._peers[peer] = t  # now the most recently updated
        while len(self._peers) > self.max_peers:
            del self._peers[next(iter(self._peers))]
        self.changed = True
        return t

    def rate(self, peer: str) -> float:
        """Probability that the next draw for ``peer`` says "check" (its next hop session)."""
        streak = self._peers.get(peer, _Trust()).streak
        if streak < self.new_windows:
            return 1.0
        return max(self.min_rate, math.sqrt(self.new_windows / streak))

    def should_check(self, peer: str) -> bool:
        return self._rng.random() < self.rate(peer)

    def valid(self, peer: str) -> None:
        t = self._update(peer)
        t.streak += 1
        t.valid += 1

    def invalid(self, peer: str) -> None:
        t = self._update(peer)
        t.streak = 0
        t.invalid += 1

    def statistics(self, peer: str) -> dict[str, int]:
        t = self._peers.get(peer, _Trust())
        return {"streak": t.streak, "valid": t.valid, "invalid": t.invalid}

    def to_json(self) -> dict[str, Any]:
        """``{"version": 1, "peers": [[peer, streak, valid, invalid], ...]}``, least recently
        updated first (JSON-ready)."""
        return {"version": TRUST_FILE_VERSION,
                "peers": [[p, t.streak, t.valid, t.invalid] for p, t in self._peers.items()]}

    def load(self, data: Any) -> int:
        """Replace what this book knows with ``data`` (a :meth:`to_json` value; the most recently
        updated ``max_peers`` entries are kept). Returns how many peers it now knows. Raises
        ValueError, and changes nothing, if anything in ``data`` is malformed."""
        if not isinstance(data, dict) or data.get("version") != TRUST_FILE_VERSION:
            raise ValueError(f"not a version {TRUST_FILE_VERSION} trust book")
        if set(data) != {"version", "peers"} or not isinstance(data["peers"], list):
            raise ValueError("expected exactly the keys version and peers (a list)")
        peers: dict[str, _Trust] = {}
        for i, entry in enumerate(data["peers"]):
            if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
                    and 0 < len(entry[0]) <= MAX_PEER_ID_CHARS
                    and all(type(n) is int and 0 <= n <= MAX_COUNT for n in entry[1:])
                    and entry[1] <= entry[2]):
                raise ValueError(f"peers[{i}]: expected [peer id, streak, valid, invalid] with "
                                 f"0 <= streak <= valid <= {MAX_COUNT} and invalid <= {MAX_COUNT}")
            peers.pop(entry[0], None)  # a repeated peer: its later entry counts
            peers[entry[0]] = _Trust(entry[1], entry[2], entry[3])
        self._peers = dict(list(peers.items())[-self.max_peers:])
        self.changed = False
        return len(self._peers)
