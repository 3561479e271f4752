"""The keys idlefleet uses in the (standard, ``/ipfs/kad/1.0.0``) Kademlia DHT, computed without libp2p.

The DHT protocol is the ordinary libp2p Kademlia one, so what keeps idlefleet's entries apart from
anyone else's is the *keys* (see ``docs/PROTOCOL.md`` section 5):

- a node's signed capacity record is stored under the UTF-8 key ``/idlefleet/<peer_id>``; every
  idlefleet node validates values under the ``idlefleet`` namespace (a record signed by
  ``<peer_id>``, highest ``seq`` wins), so nobody else can write there;
- hosts of a model block announce themselves as *providers* of a content identifier derived from
  the string ``idlefleet-blocks/<model_id>/<block>``::

      digest    = sha256( utf8("idlefleet-blocks/<model_id>/<block>") )
      multihash = 0x12 0x20 | digest            (sha2-256, 32 bytes)
      cid       = 0x01 0x55 | multihash         (CIDv1, codec raw)
      text      = "b" + base32-lower-no-padding(cid)

  The provider key on the wire (``ADD_PROVIDER`` / ``GET_PROVIDERS`` ``key`` field) is the
  multihash, as for any CID, so js-libp2p's ``provide(cid)`` / ``findProviders(cid)`` and
  go-libp2p's work with these CIDs unchanged;
- a node of region ``R`` (a geohash prefix) announces itself as a provider of the *rendezvous* CID
  derived the same way from ``idlefleet-region/<R>``, so a plain Kademlia ``GET_PROVIDERS`` finds
  the nodes of a region.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = [
    "BLOCK_PROVIDER_PREFIX",
    "RECORD_NAMESPACE",
    "REGION_RENDEZVOUS_PREFIX",
    "block_provider_cid",
    "block_provider_cid_bytes",
    "block_provider_multihash",
    "block_provider_name",
    "record_key",
    "region_rendezvous_cid",
    "region_rendezvous_cid_bytes",
    "region_rendezvous_multihash",
    "region_rendezvous_name",
]

#: Namespace of record keys (``/idlefleet/<peer_id>``); DHT nodes route its values to our validator.
RECORD_NAMESPACE = "idlefleet"
#: Prefix of the string a block's provider CID is the hash of.
BLOCK_PROVIDER_PREFIX = "idlefleet-blocks"
#: Prefix of the string a region's rendezvous CID is the hash of.
REGION_RENDEZVOUS_PREFIX = "idlefleet-region"

_SHA2_256 = bytes([0x12, 0x20])  # multihash: code sha2-256, digest length 32
_CIDV1_RAW = bytes([0x01, 0x55])  # CID version 1, multicodec raw
_GEOHASH = set("0123456789bcdefghjkmnpqrstuvwxyz")


def record_key(peer_id: str) -> str:
    """DHT key under which ``peer_id`` stores its latest signed capacity record."""
    return f"/{RECORD_NAMESPACE}/{peer_id}"


def block_provider_name(model_id: str, block: int) -> str:
    """The documented string a block's provider CID is derived from."""
    if block < 0:
        raise ValueError(f"block must be >= 0, got {block}")
    return f"{BLOCK_PROVIDER_PREFIX}/{model_id}/{block}"


def _multihash(name: str) -> bytes:
    return _SHA2_256 + hashlib.sha256(name.encode("utf-8")).digest()


def _cid_text(cid: bytes) -> str:
    return "b" + base64.b32encode(cid).decode("ascii").lower().rstrip("=")


def block_provider_multihash(model_id: str, block: int) -> bytes:
    """sha2-256 multihash of the block's provider name: the key bytes on the wire."""
    return _multihash(block_provider_name(model_id, block))


def block_provider_cid_bytes(model_id: str, block: int) -> bytes:
    """Binary CIDv1 (raw codec) addressing the hosts of ``block`` of ``model_id``."""
    return _CIDV1_RAW + block_provider_multihash(model_id, block)


def block_provider_cid(model_id: str, block: int) -> str:
    """The same CID in its canonical text form (multibase base32, ``b...``)."""
    return _cid_text(block_provider_cid_bytes(model_id, block))


def region_rendezvous_name(region: str) -> str:
    """The documented string a region's rendezvous CID is derived from (``region``: a geohash
    prefix, 1..12 characters of ``0-9 b-h j k m n p-z``)."""
    if not (1 <= len(region) <= 12 and set(region) <= _GEOHASH):
        raise ValueError(f"region must be a geohash prefix, got {region!r}")
    return f"{REGION_RENDEZVOUS_PREFIX}/{region}"


def region_rendezvous_multihash(region: str) -> bytes:
    """sha2-256 multihash of the region's rendezvous name: the key bytes on the wire."""
    return _multihash(region_rendezvous_name(region))


def region_rendezvous_cid_bytes(region: str) -> bytes:
    """Binary CIDv1 (raw codec) the nodes of ``region`` announce themselves as providers of."""
    return _CIDV1_RAW + region_rendezvous_multihash(region)


def region_rendezvous_cid(region: str) -> str:
    """The same CID in its canonical text form (multibase base32, ``b...``)."""
    return _cid_text(region_rendezvous_cid_bytes(region))
