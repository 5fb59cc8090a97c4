"""Rendezvous (highest-random-weight) hashing: every node ranks the peers for a key alike.

The owner of a key is the peer with the highest hash(peer, key); the next ones are the
fail-over order. Removing a peer moves only the keys it owned; adding one takes about 1/N.
"""

import hashlib
from collections.abc import Iterable


def weight(peer: str, key: str) -> int:
    digest = hashlib.blake2b(f"{peer}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranked(peers: Iterable[str], key: str) -> list[str]:
    """`peers` from the owner of `key` down (ties, practically impossible, by name)."""
    return sorted(set(peers), key=lambda p: (weight(p, key), p), reverse=True)


def owner(peers: Iterable[str], key: str) -> str | None:
    order = ranked(peers, key)
    return order[0] if order else None
