"""Peer IDs computed by protocols.peerid match libp2p's own, and garbage is rejected cleanly."""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.peerid import (
    b58decode,
    b58encode,
    peer_id_from_public_key,
    public_key_from_peer_id,
)

# Test vector (also in docs/PROTOCOL.md section 1): Ed25519 private key 0x01 * 32.
VECTOR_PUBLIC_KEY = bytes.fromhex(
    "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
)
VECTOR_PEER_ID = "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5"


def test_vector_key() -> None:
    key = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    assert key.public_key().public_bytes_raw() == VECTOR_PUBLIC_KEY
    assert peer_id_from_public_key(VECTOR_PUBLIC_KEY) == VECTOR_PEER_ID
    assert public_key_from_peer_id(VECTOR_PEER_ID) == VECTOR_PUBLIC_KEY
    libp2p_pair = create_new_key_pair(b"\x01" * 32)
    assert ID.from_pubkey(libp2p_pair.public_key).to_base58() == VECTOR_PEER_ID


@pytest.mark.parametrize("seed", [bytes([i]) * 32 for i in range(8)])
def test_matches_libp2p(seed: bytes) -> None:
    pair = create_new_key_pair(seed)
    raw = pair.public_key.to_bytes()
    expected = ID.from_pubkey(pair.public_key).to_base58()
    assert peer_id_from_public_key(raw) == expected
    assert expected.startswith("12D3KooW")
    assert public_key_from_peer_id(expected) == raw


def test_random_keys_round_trip() -> None:
    rng = random.Random(2)
    for _ in range(200):
        raw = rng.randbytes(32)
        assert public_key_from_peer_id(peer_id_from_public_key(raw)) == raw


def test_base58_leading_zeros() -> None:
    for data in [b"", b"\x00", b"\x00\x00\x01", b"\x00\xff" * 5, bytes(range(40))]:
        assert b58decode(b58encode(data)) == data
    assert b58encode(b"\x00\x00\x01") == "112"


def test_wrong_key_length_is_a_local_error() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        peer_id_from_public_key(b"\x01" * 31)


@pytest.mark.parametrize(
    "peer_id",
    [
        "",
        "0OIl",  # characters outside the base58 alphabet
        "12D3KooW",  # too short
        "1" * 200,  # too long
        VECTOR_PEER_ID + "1",  # trailing garbage
        "2" + VECTOR_PEER_ID[1:],  # first byte not the identity multihash code
        "bafzaajaiaejca",  # CID form, not supported
    ],
)
def test_rejects_non_ed25519_or_garbage(peer_id: str) -> None:
    with pytest.raises(RemoteProtocolError):
        public_key_from_peer_id(peer_id)


def test_rejects_other_key_types() -> None:
    from libp2p.crypto.secp256k1 import create_new_key_pair as secp256k1_pair

    secp = ID.from_pubkey(secp256k1_pair(b"\x02" * 32).public_key).to_base58()
    assert secp.startswith("16Uiu2")
    with pytest.raises(RemoteProtocolError):
        public_key_from_peer_id(secp)
    # A sha2-256 multihash ID (the form RSA keys use): right length class, wrong code.
    with pytest.raises(RemoteProtocolError):
        public_key_from_peer_id(b58encode(b"\x12\x20" + b"\x07" * 32))


def test_rejects_non_string() -> None:
    with pytest.raises(RemoteProtocolError):
        public_key_from_peer_id(b"12D3KooW")  # type: ignore[arg-type]


def test_fuzz_only_remote_errors() -> None:
    rng = random.Random(7)
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0OIl+/="
    for _ in range(2000):
        if rng.random() < 0.5:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        else:
            chars = list(VECTOR_PEER_ID)
            chars[rng.randrange(len(chars))] = rng.choice(alphabet)
            text = "".join(chars)
        try:
            raw = public_key_from_peer_id(text)
        except RemoteProtocolError:
            continue
        assert len(raw) == 32
        assert peer_id_from_public_key(raw) == text  # only canonical IDs are accepted
