"""The store facade on its own: one copy per NAR, and correct file fields when deduplicating."""

import hashlib
import lzma
from pathlib import Path

from agent.nix.hashes import Hash
from agent.nix.narinfo import NarInfo
from agent.nix.narinfo import parse as parse_narinfo
from agent.nix.storepath import StorePath
from agent.store.store import Store


def _info(hash_char: str, nar: bytes) -> NarInfo:
    """An upstream narinfo without FileHash/FileSize (they are optional)."""
    return NarInfo(store_path=StorePath(hash_char * 32, f"p-{hash_char}"),
                   url=f"nar/{hash_char}.nar.xz", compression="xz",
                   nar_hash=Hash("sha256", hashlib.sha256(nar).digest()), nar_size=len(nar))


def test_a_second_narinfo_for_a_committed_nar_gets_its_real_file_fields(tmp_path: Path) -> None:
    nar = b"nix-archive-1 pretend" * 100
    packed = lzma.compress(nar)
    store = Store(tmp_path / "store")
    first = store.remember(_info("a", nar), "http://up/")
    fd, tmp = store.new_temp()
    with open(fd, "wb") as f:
        f.write(packed)
    file_hash = Hash("sha256", hashlib.sha256(packed).digest())
    store.commit_nar(tmp, first.nar_file, file_hash, len(packed))

    second = parse_narinfo(store.remember(_info("b", nar), "http://up/").text)
    assert second.url == first.nar_file  # one copy
    assert second.file_hash == file_hash and second.file_size == len(packed)
    assert (store.layout.root / "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.narinfo").exists()
    assert store.usage()["nars"] == len(packed)


def test_a_listing_lives_as_long_as_some_encoding_of_its_nar(tmp_path: Path) -> None:
    nar = b"nix-archive-1 pretend" * 100
    packed = lzma.compress(nar)
    store = Store(tmp_path / "store")
    row = store.remember(_info("c", nar), "http://up/")
    fd, tmp = store.new_temp()
    with open(fd, "wb") as f:
        f.write(packed)
    store.commit_nar(tmp, row.nar_file, Hash("sha256", hashlib.sha256(packed).digest()),
                     len(packed), listing=b'{"version":1,"root":{"type":"regular"}}')
    assert store.read_listing("c" * 32) == b'{"version":1,"root":{"type":"regular"}}'
    store.remove_nar(row.nar_file)
    assert store.read_listing("c" * 32) is None
    assert not any(store.layout.listing_dir.iterdir())
