"""Node identity: the key file's creation, permissions and contents, and the peer id it yields."""

from __future__ import annotations

import base64
import os
import random
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.peer.id import ID

from idlefleet.p2p.identity import (
    create_key_file,
    libp2p_key_pair,
    load_key_file,
    load_or_create_key,
    peer_id_of,
    raw_public_key,
)
from idlefleet.protocols.errors import ConfigError
from idlefleet.protocols.peerid import public_key_from_peer_id

FIXED_KEY = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)


def raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def write_key_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def pem_of(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# --- create ---------------------------------------------------------------------------------


def test_create_key_file_writes_a_pkcs8_pem_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    key = create_key_file(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = serialization.load_pem_private_key(data, password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    assert raw_private(loaded) == raw_private(key)


def test_create_key_file_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "node.key"
        create_key_file(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_create_key_file_makes_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "node.key"
    create_key_file(path)
    assert path.is_file()


def test_create_key_file_refuses_to_overwrite_an_identity(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = create_key_file(path)
    before = path.read_bytes()

    with pytest.raises(ConfigError, match="already exists"):
        create_key_file(path)

    assert path.read_bytes() == before
    assert raw_private(load_key_file(path)) == raw_private(first)


def test_each_created_key_is_new(tmp_path: Path) -> None:
    a = create_key_file(tmp_path / "a.key")
    b = create_key_file(tmp_path / "b.key")
    assert peer_id_of(a) != peer_id_of(b)


# --- load -----------------------------------------------------------------------------------


def test_load_key_file_round_trips(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "node.key", pem_of(FIXED_KEY))
    assert raw_private(load_key_file(path)) == raw_private(FIXED_KEY)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o660, 0o666])
def test_load_key_file_rejects_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = write_key_file(tmp_path / "node.key", pem_of(FIXED_KEY), mode)
    with pytest.raises(ConfigError) as exc:
        load_key_file(path)
    message = str(exc.value)
    assert "chmod 600" in message
    assert str(path) in message
    assert f"{mode:04o}" in message


@pytest.mark.parametrize("mode", [0o400, 0o600, 0o700])
def test_load_key_file_accepts_owner_only_modes(tmp_path: Path, mode: int) -> None:
    path = write_key_file(tmp_path / "node.key", pem_of(FIXED_KEY), mode)
    assert peer_id_of(load_key_file(path)) == peer_id_of(FIXED_KEY)


def test_load_key_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as exc:
        load_key_file(tmp_path / "nope.key")
    assert "idlefleet keygen" in str(exc.value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a key at all\n",
        b"\x00\xff" * 50,
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN PRIVATE KEY-----\n",
        # PKCS#8 naming an algorithm nobody knows (OID 1.2.3.4).
        b"-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(bytes.fromhex("300e020100300506032a030404020400"))
        + b"\n-----END PRIVATE KEY-----\n",
    ],
)
def test_load_key_file_rejects_corrupt_contents(tmp_path: Path, data: bytes) -> None:
    path = write_key_file(tmp_path / "node.key", data)
    with pytest.raises(ConfigError, match="corrupt"):
        load_key_file(path)


def test_load_key_file_rejects_truncated_pem(tmp_path: Path) -> None:
    pem = pem_of(FIXED_KEY)
    path = write_key_file(tmp_path / "node.key", pem[: len(pem) // 2])
    with pytest.raises(ConfigError, match="corrupt"):
        load_key_file(path)


def test_bit_flipped_key_file_gives_a_clear_error_or_a_key(tmp_path: Path) -> None:
    # A damaged disk: flip bits inside the DER. Whatever happens, it is a ConfigError or a key,
    # never a raw cryptography exception.
    pem = pem_of(FIXED_KEY)
    der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    rng = random.Random(7)
    path = tmp_path / "node.key"
    for _ in range(300):
        flipped = bytearray(der)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        path.unlink(missing_ok=True)
        write_key_file(path, b"-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(bytes(flipped))
                       + b"\n-----END PRIVATE KEY-----\n")
        try:
            key = load_key_file(path)
        except ConfigError:
            continue
        assert isinstance(key, Ed25519PrivateKey)


def test_load_key_file_rejects_an_ec_key(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "node.key", pem_of(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ConfigError, match="Ed25519") as exc:
        load_key_file(path)
    assert "EC" in str(exc.value)


def test_load_key_file_rejects_an_encrypted_key(tmp_path: Path) -> None:
    pem = FIXED_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"secret"))
    path = write_key_file(tmp_path / "node.key", pem)
    with pytest.raises(ConfigError):
        load_key_file(path)


# --- load_or_create ---------------------------------------------------------------------------


def test_load_or_create_creates_then_loads_the_same_identity(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node.key"
    key1, created1 = load_or_create_key(path)
    key2, created2 = load_or_create_key(path)

    assert (created1, created2) == (True, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert raw_private(key1) == raw_private(key2)
    assert peer_id_of(key1) == peer_id_of(key2)


def test_load_or_create_does_not_replace_a_bad_key_file(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "node.key", pem_of(FIXED_KEY), 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_key(path)
    assert path.read_bytes() == pem_of(FIXED_KEY)


# --- peer id ----------------------------------------------------------------------------------


def test_peer_id_matches_libp2p() -> None:
    for key in (FIXED_KEY, Ed25519PrivateKey.generate()):
        pair = libp2p_key_pair(key)
        expected = ID.from_pubkey(pair.public_key).to_base58()
        assert peer_id_of(key) == expected
        assert expected.startswith("12D3KooW")
        assert public_key_from_peer_id(expected) == raw_public_key(key)


def test_libp2p_key_pair_holds_the_same_key() -> None:
    pair = libp2p_key_pair(FIXED_KEY)
    assert pair.public_key.to_bytes() == raw_public_key(FIXED_KEY)
    # Signatures made by libp2p's copy verify under our key.
    sig = pair.private_key.sign(b"hello")
    FIXED_KEY.public_key().verify(sig, b"hello")
