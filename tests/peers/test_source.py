"""PeerSource's choices, without a network: whom it asks for a key, and the NAR URL tag."""

from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path

from agent.nix.narinfo import parse
from agent.nix.nix32 import ALPHABET
from agent.peers.membership import Membership
from agent.peers.protocol import PeerToken
from agent.peers.rendezvous import ranked
from agent.peers.source import PeerSource, _tag_nar_url, _untag
from agent.upstream.client import Timeouts

ME = "http://10.0.0.1:37517"
OTHERS = [f"http://10.0.0.{i}:37517" for i in range(2, 6)]


def _hash() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(32))


async def test_asks_the_owner_and_the_next_peers_above_itself_or_the_next_for_its_own(
        tmp_path: Path) -> None:
    (tmp_path / "t").write_text("x")
    source = PeerSource(Membership(ME, [ME, *OTHERS]), Timeouts(), 30, PeerToken(tmp_path / "t"),
                        [])
    await source.start()
    try:
        assert sorted(source.peers) == OTHERS  # itself excluded
        for key in (_hash() for _ in range(300)):
            order = ranked([ME, *OTHERS], key)
            peers, local_only = source.order(key)
            ids = [p.id for p in peers]
            if order[0] == ME:
                assert (ids, local_only) == ([order[1]], True)
            else:
                assert (ids, local_only) == (order[:order.index(ME)], False)
    finally:
        await source.close()


def test_nar_url_is_tagged_with_its_narinfo_and_nothing_else_changes() -> None:
    h = _hash()
    info = parse(f"StorePath: /nix/store/{h}-x\nURL: nar/abc.nar.xz?evil=1\nCompression: xz\n"
                 f"NarHash: sha256:{'0' * 52}\nNarSize: 1\nSig: k:s\n")
    tagged = _tag_nar_url(info, h)
    assert tagged.url == f"nar/abc.nar.xz?narinfo={h}"
    assert replace(tagged, url=info.url) == info
    assert _untag(f"nar/abc.nar.xz?narinfo={h}") == ("nar/abc.nar.xz", h)
    assert _untag("nar/abc.nar.xz") == ("nar/abc.nar.xz", None)
    assert _untag("nar/abc.nar.xz?narinfo=../../etc") == ("nar/abc.nar.xz", None)
