"""Node identity: one Ed25519 key per node, kept in a key file readable only by its owner.

The key file is PKCS#8 PEM (what ``openssl genpkey -algorithm ed25519`` writes), created with mode
0600. The libp2p peer ID derives from its public key, so the file *is* the node's identity.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InternalError, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pEd25519PrivateKey
from libp2p.crypto.keys import KeyPair

from idlefleet.protocols.errors import ConfigError
from idlefleet.protocols.peerid import peer_id_from_public_key

__all__ = ["create_key_file", "libp2p_key_pair", "load_key_file", "load_or_create_key", "peer_id_of"]


def create_key_file(path: Path) -> Ed25519PrivateKey:
    """Create a new key file at ``path`` (mode 0600). Raises ConfigError if it already exists."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"key file {path} already exists; refusing to overwrite an identity") from None
    except OSError as e:
        raise ConfigError(f"cannot create key file {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def load_key_file(path: Path) -> Ed25519PrivateKey:
    """Load a key file. Raises ConfigError if it is missing, readable by others, or not an Ed25519 key."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"key file {path} does not exist (create one with `idlefleet keygen`)") from None
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"key file {path} is not a regular file (a directory?); give the key's file path")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be readable by its "
            f"owner only (run: chmod 600 {path})"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm, InternalError) as e:  # a damaged file raises any
        raise ConfigError(f"key file {path} is corrupt or not a PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"key file {path} holds a {type(key).__name__}; idlefleet needs Ed25519")
    return key


def load_or_create_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """Load the key at ``path``, creating it on first run. Returns (key, created)."""
    if path.exists():
        return load_key_file(path), False
    return create_key_file(path), True


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def peer_id_of(key: Ed25519PrivateKey) -> str:
    """The libp2p peer ID (base58, ``12D3KooW...``) of this key."""
    return peer_id_from_public_key(raw_public_key(key))


def libp2p_key_pair(key: Ed25519PrivateKey) -> KeyPair:
    """The same key as a py-libp2p KeyPair, for the host."""
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    private = Libp2pEd25519PrivateKey.from_bytes(seed)
    return KeyPair(private, private.get_public_key())
