"""The NAR reader and writer, against archives made by the real `nix-store --dump`."""

import contextlib
import json
import os
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.nix import nar
from agent.nix.nar import NarFormatError, NarReader
from tests.support.nixenv import Closure, nix_env

FAST = settings(max_examples=150, deadline=None)


def nix_dump(path: Path | str) -> bytes:
    return subprocess.run(["nix-store", "--dump", str(path)], env=nix_env(), check=True,
                          capture_output=True).stdout


def _sample_tree(root: Path) -> Path:
    d = root / "tree"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "hello.txt").write_text("hello\n")
    (d / "empty").write_bytes(b"")
    (d / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (d / "run.sh").chmod(0o755)
    (d / "sub" / "deeper" / "blob").write_bytes(os.urandom(1000))
    (d / "link").symlink_to("hello.txt")
    (d / "sub" / "dangling").symlink_to("../nowhere/at all")
    return d


def _check_against_disk(listing: dict[str, Any], path: Path, data: bytes) -> None:
    """Every listed node matches the file on disk, and narOffset points at its bytes."""
    if path.is_symlink():
        assert listing == {"type": "symlink", "target": os.readlink(path)}
    elif path.is_dir():
        assert listing["type"] == "directory"
        assert sorted(listing["entries"]) == sorted(p.name for p in path.iterdir())
        for name, child in listing["entries"].items():
            _check_against_disk(child, path / name, data)
    else:
        content = path.read_bytes()
        assert listing["type"] == "regular"
        assert listing["size"] == len(content)
        assert listing.get("executable", False) == bool(path.stat().st_mode & 0o100)
        assert data[listing["narOffset"]:listing["narOffset"] + len(content)] == content


def test_listing_of_a_real_dump_matches_the_tree_and_nix_listing(
        nix_available: None, tmp_path: Path) -> None:
    tree = _sample_tree(tmp_path)
    store_path = subprocess.run(["nix-store", "--add", str(tree)], env=nix_env(), check=True,
                                capture_output=True, text=True).stdout.strip()
    data = nix_dump(store_path)
    assert nar.dump(tree) == data  # the writer is byte-identical to Nix's
    listing = nar.list_nar(data)
    _check_against_disk(listing, Path(store_path), data)
    # Nix's own listing (write-nar-listing) is the same JSON, narOffset included.
    cache = tmp_path / "cache"
    subprocess.run(["nix", "copy", "--to",
                    f"file://{cache}?write-nar-listing=true&compression=none", store_path],
                   env=nix_env(), check=True, capture_output=True)
    ls = json.loads(next(cache.glob("*.ls")).read_text())
    assert ls["root"] == listing


@pytest.mark.parametrize("chunk", [1, 5, 8, 4096])
def test_real_closure_dumps_parse_in_any_chunking(small_closure: Closure, chunk: int) -> None:
    for path in small_closure.paths:
        data = nix_dump(path)
        # Byte by byte over 200 kB is slow and shows nothing new.
        data_chunk = 997 if chunk == 1 and len(data) > 20_000 else chunk
        listing = nar.list_nar(data, chunk=data_chunk)
        _check_against_disk(listing, Path(path), data)
        assert nar.dump(Path(path)) == data


def test_single_file_and_symlink_roots(tmp_path: Path) -> None:
    assert nar.list_nar(nar.build(b"abc")) == {"type": "regular", "size": 3, "narOffset": 96}
    assert nar.list_nar(nar.build(("link", "/x"))) == {"type": "symlink", "target": "/x"}
    exe = nar.list_nar(nar.build(("x", b"")))
    assert exe["executable"] is True and exe["size"] == 0


def _s(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def _t(*items: bytes) -> bytes:
    return b"".join(_s(i) for i in items)


def _dir(*entries: bytes) -> bytes:
    return _t(b"(", b"type", b"directory") + b"".join(entries) + _t(b")")


def _entry(name: bytes, node: bytes = _t(b"(", b"type", b"regular", b"contents", b"",
                                         b")")) -> bytes:
    return _t(b"entry", b"(", b"name", name, b"node") + node + _t(b")")


MAGIC = _s(b"nix-archive-1")
FILE = MAGIC + _t(b"(", b"type", b"regular", b"contents", b"abc", b")")

BAD: list[tuple[str, bytes, str]] = [
    ("bad magic", _s(b"nix-archive-2") + FILE[len(MAGIC):], "expected 'nix-archive-1'"),
    ("no magic", b"", "truncated"),
    ("bad padding", FILE[:-16 - 1] + b"\x01" + FILE[-16:], "padding"),
    ("bad token padding", MAGIC + struct.pack("<Q", 1) + b"(\0\0\0\0\0\0\x07"
     + _t(b"type", b"regular", b"contents", b"", b")"), "padding"),
    ("unsorted", MAGIC + _dir(_entry(b"b"), _entry(b"a")), "unsorted directory entry"),
    ("duplicate", MAGIC + _dir(_entry(b"a"), _entry(b"a")), "duplicate directory entry"),
    ("dot", MAGIC + _dir(_entry(b".")), "invalid directory entry name"),
    ("dotdot", MAGIC + _dir(_entry(b"..")), "invalid directory entry name"),
    ("slash", MAGIC + _dir(_entry(b"a/b")), "invalid directory entry name"),
    ("nul", MAGIC + _dir(_entry(b"a\0b")), "invalid directory entry name"),
    ("empty name", MAGIC + _dir(_entry(b"")), "invalid directory entry name"),
    ("trailing data", FILE + _s(b"x"), "trailing data"),
    ("trailing zeros", FILE + b"\0" * 8, "trailing data"),
    ("truncated", FILE[:-9], "truncated"),
    ("truncated contents", FILE[:-30], "truncated"),
    ("unknown type", MAGIC + _t(b"(", b"type", b"fifo", b")"), "unknown node type"),
    ("missing contents", MAGIC + _t(b"(", b"type", b"regular", b")"), "expected 'contents'"),
    ("huge token", MAGIC + struct.pack("<Q", 1 << 40), "too long"),
    ("empty target", MAGIC + _t(b"(", b"type", b"symlink", b"target", b"", b")"),
     "bad symlink target"),
    ("junk in dir", MAGIC + _dir(_t(b"nope")), "expected 'entry' or ')'"),
]


@pytest.mark.parametrize("name,data,message", BAD, ids=[b[0] for b in BAD])
def test_malformed_archives_raise_a_precise_error(name: str, data: bytes, message: str) -> None:
    for chunk in (1, 3, len(data) or 1):
        with pytest.raises(NarFormatError, match=re.escape(message)):
            nar.list_nar(data, chunk=chunk)


# --- properties --------------------------------------------------------------------------

names = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=12).filter(lambda n: n not in (".", ".."))
leaves = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.just("x"), st.binary(max_size=64)),
    st.tuples(st.just("link"), st.text(st.characters(blacklist_characters="\0",
                                                     blacklist_categories=("Cs",)),
                                       min_size=1, max_size=20)),
)
trees = st.recursive(leaves, lambda kids: st.dictionaries(names, kids, max_size=5),
                     max_leaves=20)


def _tree_of_listing(listing: dict[str, Any], data: bytes) -> Any:
    if listing["type"] == "symlink":
        return ("link", listing["target"])
    if listing["type"] == "directory":
        return {k: _tree_of_listing(v, data) for k, v in listing["entries"].items()}
    content = data[listing["narOffset"]:listing["narOffset"] + listing["size"]]
    return ("x", content) if listing.get("executable") else content


@FAST
@given(tree=trees, chunk=st.integers(1, 64))
def test_writer_then_reader_round_trips(tree: Any, chunk: int) -> None:
    data = nar.build(tree)
    assert _tree_of_listing(nar.list_nar(data, chunk=chunk), data) == tree
    # The Data events carry exactly the file bytes, in order.
    reader = NarReader()
    events = [e for i in range(0, len(data), chunk) for e in reader.feed(data[i:i + chunk])]
    reader.finish()
    files = {e.path: b"" for e in events if isinstance(e, nar.File)}
    for e in events:
        if isinstance(e, nar.Data):
            files[e.path] += e.data
    assert all(isinstance(v, bytes) for v in files.values())
    assert reader.offset == len(data)


@FAST
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_only_nar_format_error(data: bytes) -> None:
    with contextlib.suppress(NarFormatError):
        nar.list_nar(data, chunk=7)


@FAST
@given(tree=trees, data=st.data())
def test_mutated_archives_raise_only_nar_format_error(tree: Any, data: st.DataObject) -> None:
    raw = bytearray(nar.build(tree))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(NarFormatError):
        nar.list_nar(bytes(raw[:cut]), chunk=data.draw(st.integers(1, 32)))


def test_a_listing_skips_file_bytes_without_buffering_them() -> None:
    """Verification builds a listing of every NAR it checks: a file's bytes pass through
    uncopied, so memory does not grow with the chunk size or the file."""
    size = 64 << 20
    header = _t(b"nix-archive-1", b"(", b"type", b"regular", b"contents") + \
        struct.pack("<Q", size)
    reader = nar.ListingReader()
    reader.feed(header)
    chunk = b"\x07" * (1 << 20)
    for _ in range(size // len(chunk)):
        reader.feed(chunk)
        assert len(reader._reader._buf) == 0
    reader.feed(_t(b")"))
    assert reader.result() == {"type": "regular", "size": size, "narOffset": len(header)}
