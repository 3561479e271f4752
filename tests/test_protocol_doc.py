"""docs/PROTOCOL.md cannot drift from the code: every worked example and registry in it is read
out of the document itself and checked against the implementation.

Each check parses the Markdown (tables, hex blocks, the sentences that state a number), so editing
a value in the document without changing the code — or the other way round — fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import idlefleet.node.runtime.node  # noqa: F401  (registers the gossip kinds)
from idlefleet.protocols import session as S
from idlefleet.protocols import wire
from idlefleet.protocols.errors import RecordRejected
from idlefleet.protocols.peerid import peer_id_from_public_key
from idlefleet.protocols.records import (
    DOMAIN,
    REJECT_REASONS,
    CapacityRecord,
    encode_body,
    encode_signed,
    validate_record,
)

DOC = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
SEED = b"\x01" * 32  # the document's test-vector key (section 1.1)


def section(number: str) -> str:
    """The text of section ``number`` (e.g. ``"3.6"``) up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(number)}\.? .*?$(.*?)(?=^#+ |\Z)", DOC, re.S | re.M)
    assert match, f"docs/PROTOCOL.md has no section {number}"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text``, cells stripped."""
    lines = [ln.strip() for ln in text.splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start + 2:]:  # skip the header and the |---| line
        if not ln.startswith("|"):
            break
        rows.append([cell.strip() for cell in ln.strip("|").split("|")])
    return rows


def code(cell: str) -> str:
    """The text inside the first pair of backticks of a table cell."""
    match = re.search(r"`([^`]*)`", cell)
    assert match, f"no `code` in table cell {cell!r}"
    return match.group(1)


def hex_bytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# --- section 1.1: peer ID test vector -------------------------------------------------------------

def test_peer_id_vector() -> None:
    text = section("1.1")
    pub_hex = re.search(r"public key\s+([0-9a-f]{64})", text)
    pid = re.search(r"peer ID\s+(12D3KooW\w+)", text)
    assert pub_hex and pid
    pub = Ed25519PrivateKey.from_private_bytes(SEED).public_key().public_bytes_raw()
    assert pub.hex() == pub_hex.group(1)
    assert peer_id_from_public_key(pub) == pid.group(1)


# --- section 2: envelope example and the kinds registry ------------------------------------------

def test_envelope_example() -> None:
    text = section("2.3")
    match = re.search(r'Example: `(\{.*?\})` encodes as\s*```\s*\n(.*?)```', text, re.S)
    assert match, "section 2.3 lost its worked example"
    example = ast.literal_eval(match.group(1))
    encoded = hex_bytes(match.group(2))
    assert wire.encode_envelope(example["k"], example["b"]) == encoded
    env = wire.decode_envelope(encoded)
    assert (env.kind, env.body) == (example["k"], example["b"])


def test_kinds_table_is_the_registry() -> None:
    text = DOC.split("<!-- kinds-table -->", 1)[1]
    documented = {code(row[0]): int(re.sub(r"\D", "", row[1].split("(")[0])) for row in table_rows(text)}
    assert documented == wire.KINDS


def test_frame_limit_in_docs() -> None:
    assert re.search(r"`MAX_FRAME` = 16 MiB = 16 777 216 bytes", section("2.1"))
    assert wire.MAX_FRAME == 16_777_216


# --- section 3: the record example, its validity window, the rejection reasons -------------------

def _value(cell: str) -> Any:
    """A value of the section 3.6 table: `"str"`, `0.8`, `true`, `[0, 10]`, `[...]` or nil."""
    if cell == "nil":
        return None
    text = code(cell)
    if text in ("true", "false"):
        return text == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare peer id or hex string
    return tuple(value) if isinstance(value, list) else value


def documented_record() -> CapacityRecord:
    fields = {code(row[0]): _value(row[1]) for row in table_rows(section("3.6"))}
    fields["public_key"] = bytes.fromhex(str(fields["public_key"]))
    return CapacityRecord(**fields)


def documented_record_bytes() -> bytes:
    match = re.search(r"<!-- test-vector: signed-record -->\s*```text\n(.*?)```", DOC, re.S)
    assert match, "docs/PROTOCOL.md lacks the signed-record test vector block"
    return hex_bytes(match.group(1))


def test_record_fields_table_signs_to_the_documented_bytes() -> None:
    record = documented_record()
    key = Ed25519PrivateKey.from_private_bytes(SEED)
    raw = encode_signed(record, key)
    assert raw == documented_record_bytes()
    sizes = re.search(r"The complete record, (\d+) bytes \(the body is (\d+) bytes\)", section("3.7"))
    assert sizes, "section 3.7 no longer states the sizes"
    assert (len(raw), len(encode_body(record))) == (int(sizes.group(1)), int(sizes.group(2)))
    assert re.search(rf"the {len(DOMAIN)} `DOMAIN` bytes", section("3.7"))


def test_record_example_model_id_has_the_session_form() -> None:
    # Section 6.3: a model id is gguf-sha256:<64 hex digits>; the example must be one.
    assert re.fullmatch(r"gguf-sha256:[0-9a-f]{64}", documented_record().model_id)


def test_record_validity_window() -> None:
    text = section("3.6")
    window = re.search(r"valid for `now` in `\[([\d.]+), ([\d.]+)\)`", text)
    before = re.search(r"at `([\d.]+)` it is `(\w+)`, at `([\d.]+)`\s+`(\w+)`", text)
    assert window and before, "section 3.6 no longer states the validity window and its edges"
    data = documented_record_bytes()
    lo, hi = float(window.group(1)), float(window.group(2))
    validate_record(data, lo)
    validate_record(data, hi - 0.001)
    validate_record(data, lo, last_seq=0)
    for now, reason in ((float(before.group(1)), before.group(2)), (float(before.group(3)), before.group(4))):
        with pytest.raises(RecordRejected) as info:
            validate_record(data, now)
        assert info.value.reason == reason


def test_rejection_reasons_table() -> None:
    reasons = {code(row[2]) for row in table_rows(section("3.4")) if "`" in row[2]}
    assert reasons == set(REJECT_REASONS)


# --- section 6.3: session error codes ------------------------------------------------------------

def test_session_error_codes_table() -> None:
    text = section("6.3").split("Error codes:", 1)[1]
    documented = {code(row[0]) for row in table_rows(text)}
    in_code = {value for name, value in vars(S).items() if name.startswith("ERR_")}
    assert documented == in_code


# --- section 7: verified work --------------------------------------------------------------------

def vector(name: str) -> str:
    match = re.search(rf"<!-- test-vector: {name} -->\s*```text\n(.*?)```", DOC, re.S)
    assert match, f"docs/PROTOCOL.md lacks the {name} test vector"
    return match.group(1)


def test_rows_root_vector() -> None:
    import numpy as np

    from idlefleet.protocols.tensors import encode_hidden
    from idlefleet.protocols.verification import row_digests, rows_root

    for line in vector("rows-root").strip().splitlines():
        match = re.fullmatch(r"float32 (\[\[.*\]\])\s+root ([0-9a-f]{64})", line.strip())
        assert match, line
        x = np.array(ast.literal_eval(match.group(1)), np.float32)
        assert rows_root(row_digests(encode_hidden(x))).hex() == match.group(2)


def test_step_commitment_and_receipt_vectors() -> None:
    from idlefleet.protocols.receipts import decode_receipt
    from idlefleet.protocols.verification import StepCommitment

    client_key = Ed25519PrivateKey.from_private_bytes(SEED)
    client = peer_id_from_public_key(client_key.public_key().public_bytes_raw())
    server_key = Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)
    server = peer_id_from_public_key(server_key.public_key().public_bytes_raw())
    data = hex_bytes(vector("step-commitment"))
    commitment, _ = StepCommitment.decode(data)
    assert (commitment.server, commitment.client) == (server, client)
    assert commitment.encode(commitment.sign(server_key)) == data  # Ed25519 is deterministic
    receipt = decode_receipt(hex_bytes(vector("receipt")))
    assert (receipt.server, receipt.client, receipt.tokens, receipt.verified) == (server, client, 32, 30)
