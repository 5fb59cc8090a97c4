"""ed25519 narinfo signatures: properties, and compatibility with keys and caches made by Nix."""

import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.nix import narinfo
from agent.nix.hashes import Hash
from agent.nix.narinfo import NarInfo
from agent.nix.signing import KeyFormatError, PublicKey, SecretKey, add_signature, verified_by
from agent.nix.storepath import StorePath
from tests.support.nixenv import Closure, hash_part, make_keypair

FAST = settings(max_examples=60, deadline=None)
KEY = SecretKey.generate("test-1")
hash_parts = st.text("0123456789abcdfghijklmnpqrsvwxyz", min_size=32, max_size=32)
store_paths = st.builds(StorePath, hash_parts, st.from_regex(r"[a-z][a-z0-9.-]{0,20}",
                                                             fullmatch=True))
infos = st.builds(
    NarInfo, store_path=store_paths, url=st.just("nar/x.nar"), compression=st.just("none"),
    nar_hash=st.binary(min_size=32, max_size=32).map(lambda d: Hash("sha256", d)),
    nar_size=st.integers(0, 10**12),
    references=st.lists(store_paths, max_size=3).map(tuple))


@FAST
@given(infos)
def test_sign_then_verify(info: NarInfo) -> None:
    signed = add_signature(info, KEY)
    assert verified_by(signed, [KEY.public()]) == KEY.public()
    assert verified_by(signed, [SecretKey.generate("test-1").public()]) is None
    # Fields outside the fingerprint may change (a cache may recompress).
    moved = replace(signed, url="nar/y.nar.zst", compression="zstd", file_size=3)
    assert verified_by(moved, [KEY.public()]) == KEY.public()


def _changes(info: NarInfo, other: StorePath) -> dict[str, NarInfo]:
    flipped = bytes([info.nar_hash.digest[0] ^ 1]) + info.nar_hash.digest[1:]
    return {
        "store path hash": replace(info, store_path=StorePath(other.hash_part,
                                                              info.store_path.name)),
        "store path name": replace(info, store_path=StorePath(info.store_path.hash_part,
                                                              info.store_path.name + "x")),
        "nar hash": replace(info, nar_hash=Hash("sha256", flipped)),
        "nar size": replace(info, nar_size=info.nar_size + 1),
        "added reference": replace(info, references=(*info.references, other)),
        "dropped references": replace(info, references=info.references[:-1] or (other,)),
    }


@FAST
@given(infos, store_paths)
def test_any_change_of_the_fingerprint_breaks_verification(info: NarInfo,
                                                           other: StorePath) -> None:
    signed = add_signature(info, KEY)
    for what, changed in _changes(signed, other).items():
        if changed.fingerprint() == signed.fingerprint():
            continue  # e.g. `other` equals the original path: no change to detect
        assert verified_by(changed, [KEY.public()]) is None, what


@FAST
@given(st.text(max_size=120))
def test_malformed_signatures_and_keys_never_raise_unexpectedly(text: str) -> None:
    info = NarInfo(StorePath("0" * 32, "x"), "u", "none", Hash("sha256", bytes(32)), 1,
                   sigs=(text,))
    assert verified_by(info, [KEY.public()]) is None
    for parse in (PublicKey.parse, SecretKey.parse):
        with contextlib.suppress(KeyFormatError):
            parse(text)


@pytest.fixture(scope="module")
def nix_key(nix_workdir: Path) -> tuple[Path, str]:
    return make_keypair(nix_workdir / "signing-test", "nix-made-1")


def test_keys_made_by_nix_parse_and_match(nix_key: tuple[Path, str]) -> None:
    sk_file, pk_text = nix_key
    secret = SecretKey.parse(sk_file.read_text())
    assert secret.public().to_text() == pk_text
    assert SecretKey.parse(secret.to_text()).to_text() == sk_file.read_text().strip()
    assert PublicKey.parse(pk_text).to_text() == pk_text


def test_narinfos_signed_by_nix_verify_and_our_signature_is_identical(
        published_cache: Path, signing_key: tuple[Path, str], small_closure: Closure) -> None:
    public = PublicKey.parse(signing_key[1])
    secret = SecretKey.parse(signing_key[0].read_text())
    for path in small_closure.paths:
        info = narinfo.parse((published_cache / f"{hash_part(path)}.narinfo").read_text())
        assert verified_by(info, [public]) == public, path
        # ed25519 is deterministic: re-signing the fingerprint gives Nix's exact Sig line.
        assert secret.sign(info.fingerprint()) in info.sigs
        wrong = replace(info, nar_size=info.nar_size + 1)
        assert verified_by(wrong, [public]) is None
