"""Rendezvous hashing: every node agrees on owners, and membership changes move ~1/N keys."""

import random

from agent.peers.rendezvous import owner, ranked

KEYS = [f"{random.Random(i).getrandbits(128):032x}" for i in range(4000)]
PEERS = [f"http://10.0.0.{i}:37517" for i in range(1, 9)]


def test_every_node_computes_the_same_order_whatever_its_view_order() -> None:
    shuffled = list(reversed(PEERS))
    for key in KEYS[:200]:
        assert ranked(PEERS, key) == ranked(shuffled, key) == ranked(set(PEERS), key)
        assert sorted(ranked(PEERS, key)) == sorted(PEERS)


def test_owners_are_spread_evenly() -> None:
    counts = dict.fromkeys(PEERS, 0)
    for key in KEYS:
        counts[owner(PEERS, key)] += 1  # type: ignore[index]
    expected = len(KEYS) / len(PEERS)
    assert all(0.8 * expected < n < 1.2 * expected for n in counts.values()), counts


def test_removing_a_peer_moves_only_its_keys_to_their_next_choice() -> None:
    gone = PEERS[3]
    rest = [p for p in PEERS if p != gone]
    for key in KEYS:
        before = ranked(PEERS, key)
        if before[0] != gone:
            assert owner(rest, key) == before[0]
        else:
            assert owner(rest, key) == before[1]  # the fail-over order is the new owner


def test_adding_a_peer_moves_about_one_key_in_n() -> None:
    new = "http://10.0.0.99:37517"
    moved = [k for k in KEYS if owner(PEERS, k) != owner([*PEERS, new], k)]
    assert all(owner([*PEERS, new], k) == new for k in moved)
    share = len(moved) / len(KEYS)
    assert 0.8 / 9 < share < 1.2 / 9, share


def test_no_peers_no_owner() -> None:
    assert owner([], "abc") is None
    assert ranked([], "abc") == []
