"""libp2p peer IDs for Ed25519 keys, computed without libp2p.

A libp2p peer ID for an Ed25519 key is the identity multihash of the protobuf-encoded public key,
written in base58btc::

    peer_id = base58btc( 0x00 0x24 | 0x08 0x01 0x12 0x20 | key[32] )
              identity   Type=Ed25519  Data (32 bytes)
              multihash  (field 1)     (field 2)

so every such ID starts with ``12D3KooW``. See ``docs/PROTOCOL.md`` section 1.
"""

from __future__ import annotations

from idlefleet.protocols.errors import RemoteProtocolError

__all__ = [
    "ED25519_PEER_ID_PREFIX",
    "MAX_PEER_ID_LEN",
    "b58decode",
    "b58encode",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
]

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}

#: identity multihash header (code 0x00, length 36) + protobuf PublicKey{Type: Ed25519, Data: <32>}.
ED25519_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
_ED25519_KEY_LEN = 32

#: Longest peer ID string we parse. An Ed25519 ID is 52 characters; the cap keeps the big-integer
#: base58 arithmetic bounded on hostile input.
MAX_PEER_ID_LEN = 128


def b58encode(data: bytes) -> str:
    """Encode bytes as base58btc (Bitcoin alphabet; each leading zero byte becomes ``1``)."""
    zeros = len(data) - len(data.lstrip(b"\x00"))
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58_ALPHABET[r])
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Decode base58btc. Raises ``RemoteProtocolError`` on a character outside the alphabet."""
    n = 0
    for c in text:
        digit = _B58_INDEX.get(c)
        if digit is None:
            raise RemoteProtocolError(f"invalid base58 character {c!r}")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * zeros + body


def peer_id_from_public_key(raw_ed25519_pub: bytes) -> str:
    """Return the libp2p peer ID (``12D3KooW...``) of a raw 32-byte Ed25519 public key.

    Raises ``ValueError`` if the key is not 32 bytes (a local bug, not peer input).
    """
    if len(raw_ed25519_pub) != _ED25519_KEY_LEN:
        raise ValueError(f"Ed25519 public key must be 32 bytes, got {len(raw_ed25519_pub)}")
    return b58encode(ED25519_PEER_ID_PREFIX + bytes(raw_ed25519_pub))


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Return the raw 32-byte Ed25519 public key embedded in a peer ID.

    Raises ``RemoteProtocolError`` if ``peer_id`` is not a canonical base58btc identity-multihash
    Ed25519 peer ID (e.g. an RSA/secp256k1 ID, a CID-form ID, or garbage).
    """
    if not isinstance(peer_id, str):
        raise RemoteProtocolError(f"peer id must be a string, got {type(peer_id).__name__}")
    if not 0 < len(peer_id) <= MAX_PEER_ID_LEN:
        raise RemoteProtocolError(f"peer id length {len(peer_id)} not in 1..{MAX_PEER_ID_LEN}")
    raw = b58decode(peer_id)
    if len(raw) != len(ED25519_PEER_ID_PREFIX) + _ED25519_KEY_LEN or not raw.startswith(
        ED25519_PEER_ID_PREFIX
    ):
        raise RemoteProtocolError("peer id is not an identity-multihash Ed25519 peer id")
    return raw[len(ED25519_PEER_ID_PREFIX) :]
