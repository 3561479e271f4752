"""Signed capacity/health records: what every node gossips about itself.

A record is a frozen ``CapacityRecord`` that validates every field on construction. On the wire it
is ``msgpack {"body": bin(msgpack map of the fields), "sig": bin(64)}`` where ``sig`` is Ed25519
over ``DOMAIN + body``. ``validate_record(data, now)`` is the one pure function that decides whether
received bytes may enter a node's view; it raises ``RecordRejected`` with one of ``REJECT_REASONS``
(building a record of our own with a bad field raises ``RecordInvalid``, a local error).
Byte layouts, the field table and the validation order: ``docs/PROTOCOL.md`` section 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from idlefleet.protocols import wire
from idlefleet.protocols.errors import (
    LocalProtocolError,
    RecordInvalid,
    RecordRejected,
    RemoteProtocolError,
    peer_input,
)
from idlefleet.protocols.peerid import MAX_PEER_ID_LEN, peer_id_from_public_key

__all__ = [
    "DOMAIN",
    "GEOHASH_ALPHABET",
    "LINK_KINDS",
    "MAX_RECORD_SIZE",
    "MAX_TTL",
    "OPTIONAL_FIELDS",
    "POLICY_ACTIONS",
    "RECORD_FIELDS",
    "RECORD_VERSION",
    "REJECT_REASONS",
    "STATES",
    "CapacityRecord",
    "encode_body",
    "encode_signed",
    "record_to_dict",
    "validate_record",
]

RECORD_VERSION = 1
#: Signature domain separation: a capacity-record signature can never be replayed as a signature
#: over any other kind of message signed by the same key (and vice versa).
DOMAIN = b"idlefleet/capacity-record/v1\x00"
MAX_RECORD_SIZE = 4096
#: Longest lifetime a record may claim (expires_at - issued_at), seconds.
MAX_TTL = 600.0
SIGNATURE_LEN = 64
PUBLIC_KEY_LEN = 32

REJECT_REASONS = (
    "oversized",
    "malformed",
    "unknown_version",
    "missing_field",
    "out_of_range",
    "bad_signature",
    "signer_mismatch",
    "expired",
    "not_yet_valid",
    "stale_sequence",
)

STATES = ("joining", "online", "draining", "offline")
LINK_KINDS = ("ethernet", "wifi", "cellular")
GEOHASH_ALPHABET = "0123456789bcdefghjkmnpqrstuvwxyz"
MAX_REGION_LEN = 12
MAX_ADDRS = 8
MAX_ADDR_LEN = 256
MAX_MODEL_ID_LEN = 128
MAX_BLOCK = 100_000
MAX_SEQ = 2**63 - 1
#: Upper bound for every unix timestamp field (year 2286): rejects absurd values early.
MAX_TIMESTAMP = 1e10
MAX_CHARGING_KW = 350.0
MAX_GFLOPS = 1e6
MAX_FREE_MEMORY_MB = 10_000_000
POLICY_ACTIONS = ("serve", "drain", "stop")
MAX_POLICY_REASON_LEN = 32
#: Fields a record body may omit, with the value an omitted field means.
OPTIONAL_FIELDS: dict[str, Any] = {"policy": "serve", "policy_reason": "ok"}


def _reject(reason: str, detail: str) -> NoReturn:
    raise RecordRejected(reason, detail)


def _invalid(reason: str, detail: str) -> NoReturn:
    raise RecordInvalid(reason, detail)


def _printable_ascii(text: str) -> bool:
    # Strings from peers end up in terminal tables and logs: no control or escape characters.
    return all(" " < c <= "~" for c in text)


@dataclass(frozen=True)
class CapacityRecord:
    """One node's signed statement of its capacity and health (unsigned form).

    Construction checks every field and raises ``RecordInvalid`` (a LocalProtocolError: the record
    is ours) with reason ``malformed`` (wrong type), ``out_of_range`` (right type, bad value) or
    ``signer_mismatch`` (``peer_id`` is not the one derived from ``public_key``); the detail names
    the field; ``validate_record`` turns it into ``RecordRejected`` with the same reason. Float
    fields accept ints and store floats. Use ``dataclasses.replace`` to derive the next record (it
    re-validates).
    """

    peer_id: str
    public_key: bytes
    addrs: tuple[str, ...]
    region: str
    state: str
    battery_soc: float
    plugged_in: bool
    charging_kw: float
    thermal_headroom_c: float
    parked_since: float | None
    expected_departure: float | None
    consent: bool
    consent_expires: float | None
    link_kind: str
    link_metered: bool
    compute_gflops: float
    free_memory_mb: int
    load: float
    model_id: str
    blocks: tuple[int, int] | None
    seq: int
    issued_at: float
    expires_at: float
    # The owner policy's decision (protocols/policy.py): "serve", "drain" or "stop", and why.
    # Optional on the wire: omitted when ("serve", "ok"), so older records stay byte-identical.
    policy: str = "serve"
    policy_reason: str = "ok"

    def __post_init__(self) -> None:
        # Identity first: public_key, then the peer id that must derive from it.
        key = self.public_key
        if not isinstance(key, bytes | bytearray) or len(key) != PUBLIC_KEY_LEN:
            _invalid("malformed", f"public_key: expected {PUBLIC_KEY_LEN} bytes")
        object.__setattr__(self, "public_key", bytes(key))
        peer_id = self._str("peer_id", MAX_PEER_ID_LEN)
        if peer_id != peer_id_from_public_key(self.public_key):
            _invalid("signer_mismatch", f"peer_id {peer_id!r} is not derived from public_key")

        addrs = self.addrs
        if not isinstance(addrs, tuple):
            _invalid("malformed", f"addrs: expected a tuple, got {type(addrs).__name__}")
        if len(addrs) > MAX_ADDRS:
            _invalid("out_of_range", f"addrs: {len(addrs)} addresses, at most {MAX_ADDRS}")
        for i, addr in enumerate(addrs):
            if not isinstance(addr, str):
                _invalid("malformed", f"addrs[{i}]: expected str, got {type(addr).__name__}")
            if not (0 < len(addr) <= MAX_ADDR_LEN and addr[0] == "/" and _printable_ascii(addr)):
                _invalid(
                    "out_of_range",
                    f"addrs[{i}]: must be 1..{MAX_ADDR_LEN} printable ASCII chars starting '/'",
                )

        region = self._str("region", MAX_REGION_LEN)
        if not region or any(c not in GEOHASH_ALPHABET for c in region):
            _invalid("out_of_range", f"region: must be 1..{MAX_REGION_LEN} geohash chars")
        self._choice("state", STATES)
        self._float("battery_soc", 0.0, 1.0)
        self._bool("plugged_in")
        self._float("charging_kw", 0.0, MAX_CHARGING_KW)
        self._float("thermal_headroom_c", -100.0, 200.0)
        self._float("parked_since", 0.0, MAX_TIMESTAMP, nullable=True)
        self._float("expected_departure", 0.0, MAX_TIMESTAMP, nullable=True)
        self._bool("consent")
        self._float("consent_expires", 0.0, MAX_TIMESTAMP, nullable=True)
        self._choice("link_kind", LINK_KINDS)
        self._bool("link_metered")
        self._float("compute_gflops", 0.0, MAX_GFLOPS)
        self._int("free_memory_mb", 0, MAX_FREE_MEMORY_MB)
        self._float("load", 0.0, 1.0)
        model_id = self._str("model_id", MAX_MODEL_ID_LEN)
        if not _printable_ascii(model_id):
            _invalid("out_of_range", "model_id: must be printable ASCII")
        self._check_blocks(model_id)
        self._int("seq", 0, MAX_SEQ)
        self._float("issued_at", 0.0, MAX_TIMESTAMP)
        self._float("expires_at", 0.0, MAX_TIMESTAMP)
        self._choice("policy", POLICY_ACTIONS)
        reason = self._str("policy_reason", MAX_POLICY_REASON_LEN)
        if not reason or not _printable_ascii(reason):
            _invalid("out_of_range", "policy_reason: must be 1..32 printable ASCII chars")
        if not self.issued_at < self.expires_at <= self.issued_at + MAX_TTL:
            _invalid(
                "out_of_range",
                f"expires_at: must satisfy issued_at < expires_at <= issued_at + {MAX_TTL:g}",
            )

    def _check_blocks(self, model_id: str) -> None:
        blocks = self.blocks
        if blocks is None:
            return
        if not isinstance(blocks, tuple) or len(blocks) != 2:
            _invalid("malformed", "blocks: expected a (start, end) pair or None")
        for bound in blocks:
            if not isinstance(bound, int) or isinstance(bound, bool):
                _invalid("malformed", f"blocks: expected ints, got {type(bound).__name__}")
        start, end = blocks
        if not 0 <= start < end <= MAX_BLOCK:
            _invalid("out_of_range", f"blocks: need 0 <= start < end <= {MAX_BLOCK}")
        if not model_id:
            _invalid("out_of_range", "blocks: a block range needs a model_id")
        object.__setattr__(self, "blocks", (int(start), int(end)))

    def _str(self, name: str, max_len: int) -> str:
        value = getattr(self, name)
        if not isinstance(value, str):
            _invalid("malformed", f"{name}: expected str, got {type(value).__name__}")
        if len(value) > max_len:
            _invalid("out_of_range", f"{name}: {len(value)} chars, at most {max_len}")
        object.__setattr__(self, name, str(value))
        return str(value)

    def _choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if not isinstance(value, str):
            _invalid("malformed", f"{name}: expected str, got {type(value).__name__}")
        if value not in choices:
            _invalid("out_of_range", f"{name}: {value[:32]!r} not one of {choices}")

    def _bool(self, name: str) -> None:
        value = getattr(self, name)
        if type(value) is not bool:
            _invalid("malformed", f"{name}: expected bool, got {type(value).__name__}")

    def _int(self, name: str, lo: int, hi: int) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool):
            _invalid("malformed", f"{name}: expected int, got {type(value).__name__}")
        if not lo <= value <= hi:
            _invalid("out_of_range", f"{name}: {value} not in {lo}..{hi}")
        object.__setattr__(self, name, int(value))

    def _float(self, name: str, lo: float, hi: float, *, nullable: bool = False) -> None:
        value = getattr(self, name)
        if value is None and nullable:
            return
        if not isinstance(value, int | float) or isinstance(value, bool):
            _invalid("malformed", f"{name}: expected float, got {type(value).__name__}")
        try:
            number = float(value)
        except OverflowError:
            _invalid("out_of_range", f"{name}: not a finite number")
        if not math.isfinite(number):
            _invalid("out_of_range", f"{name}: not a finite number")
        if not lo <= number <= hi:
            _invalid("out_of_range", f"{name}: {number:g} not in {lo:g}..{hi:g}")
        object.__setattr__(self, name, number)


#: Body field names in encoding order (after "v"): exactly the dataclass fields.
RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(CapacityRecord))


def encode_body(record: CapacityRecord) -> bytes:
    """The record body bytes (the signed part): msgpack map ``{"v": 1, <fields in order>}``."""
    body: dict[str, Any] = {"v": RECORD_VERSION}
    for name in RECORD_FIELDS:
        value = getattr(record, name)
        if name not in OPTIONAL_FIELDS or value != OPTIONAL_FIELDS[name]:
            body[name] = value
    return wire.pack(body)


def encode_signed(record: CapacityRecord, private_key: Ed25519PrivateKey) -> bytes:
    """Sign ``record`` with ``private_key`` and return the wire form ``{"body", "sig"}``.

    Raises ``LocalProtocolError`` if the key is not the record's ``public_key`` or the result would
    exceed ``MAX_RECORD_SIZE``.
    """
    if private_key.public_key().public_bytes_raw() != record.public_key:
        raise LocalProtocolError("private key does not match the record's public_key")
    body = encode_body(record)
    data = wire.pack({"body": body, "sig": private_key.sign(DOMAIN + body)})
    if len(data) > MAX_RECORD_SIZE:
        raise LocalProtocolError(f"signed record is {len(data)} bytes, limit {MAX_RECORD_SIZE}")
    return data


def _unpack_map(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = wire.unpack(data, what=what)
    except RemoteProtocolError as e:
        _reject("malformed", str(e))
    if not isinstance(obj, dict):
        _reject("malformed", f"{what} is not a map but {type(obj).__name__}")
    return obj


def validate_record(
    data: bytes,
    now: float,
    *,
    last_seq: int | None = None,
    max_size: int = MAX_RECORD_SIZE,
    max_clock_skew: float = 30.0,
) -> CapacityRecord:
    """Decide whether received record bytes may be used at time ``now``; pure.

    Checks, in this order (cheapest and least trusting first; nothing but the version and the
    public key is interpreted before the signature verifies):
    size, outer decode, body decode, version, public key + signature, signer (``peer_id`` derives
    from ``public_key``), fields, time (``expired`` if ``now >= expires_at``, ``not_yet_valid`` if
    ``issued_at > now + max_clock_skew``), sequence (``stale_sequence`` if ``seq <= last_seq``).

    Returns the ``CapacityRecord``. Raises ``RecordRejected`` whose ``reason`` is one of
    ``REJECT_REASONS``; never any other exception for any ``data``.
    """
    if not math.isfinite(now):
        raise LocalProtocolError(f"now must be finite, got {now!r}")
    if len(data) > max_size:
        _reject("oversized", f"{len(data)} bytes, limit {max_size}")

    outer = _unpack_map(bytes(data), "record")
    if outer.keys() != {"body", "sig"}:
        _reject("malformed", f"record keys must be exactly body, sig; got {sorted(outer)}")
    body, sig = outer["body"], outer["sig"]
    if not isinstance(body, bytes):
        _reject("malformed", "body: expected bin")
    if not isinstance(sig, bytes) or len(sig) != SIGNATURE_LEN:
        _reject("malformed", f"sig: expected bin of {SIGNATURE_LEN} bytes")

    fields_in = _unpack_map(body, "record body")
    if "v" not in fields_in:
        _reject("missing_field", "v")
    version = fields_in.pop("v")
    if type(version) is not int:
        _reject("malformed", f"v: expected int, got {type(version).__name__}")
    if version != RECORD_VERSION:
        _reject("unknown_version", f"record version {version}, we accept {RECORD_VERSION}")

    if "public_key" not in fields_in:
        _reject("missing_field", "public_key")
    key = fields_in["public_key"]
    if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_LEN:
        _reject("malformed", f"public_key: expected bin of {PUBLIC_KEY_LEN} bytes")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, DOMAIN + body)
    except (InvalidSignature, ValueError):
        _reject("bad_signature", "Ed25519 signature does not verify under public_key")

    if "peer_id" not in fields_in:
        _reject("missing_field", "peer_id")
    if not isinstance(fields_in["peer_id"], str):
        _reject("malformed", "peer_id: expected str")
    if fields_in["peer_id"] != peer_id_from_public_key(key):
        _reject("signer_mismatch", "peer_id is not derived from the signing public_key")

    for name in RECORD_FIELDS:
        if name not in fields_in:
            if name in OPTIONAL_FIELDS:
                fields_in[name] = OPTIONAL_FIELDS[name]
                continue
            _reject("missing_field", name)
    unknown = fields_in.keys() - set(RECORD_FIELDS)
    if unknown:
        _reject("malformed", f"unknown field(s) {sorted(unknown)[:4]}")
    for name in ("addrs", "blocks"):
        value = fields_in[name]
        if isinstance(value, list):
            fields_in[name] = tuple(value)
        elif value is not None or name == "addrs":
            _reject("malformed", f"{name}: expected array")
    with peer_input():  # RecordInvalid -> RecordRejected, same reason and detail
        record = CapacityRecord(**fields_in)

    if now >= record.expires_at:
        _reject("expired", f"expired at {record.expires_at:.3f}, now {now:.3f}")
    if record.issued_at > now + max_clock_skew:
        _reject(
            "not_yet_valid",
            f"issued at {record.issued_at:.3f}, now {now:.3f} (skew {max_clock_skew:g}s)",
        )
    if last_seq is not None and record.seq <= last_seq:
        _reject("stale_sequence", f"seq {record.seq} <= last seen {last_seq}")
    return record


def record_to_dict(record: CapacityRecord) -> dict[str, Any]:
    """JSON-friendly dict: every field by name, ``public_key`` as hex, tuples as lists."""
    out: dict[str, Any] = {}
    for name in RECORD_FIELDS:
        value = getattr(record, name)
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out
