"""Properties of the pure Nix formats: nix32, hashes, store paths, narinfo."""

import base64
import contextlib
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.nix import narinfo, nix32
from agent.nix.hashes import Hash, HashError
from agent.nix.narinfo import COMPRESSIONS, NarInfo, NarInfoError
from agent.nix.storepath import StorePath, StorePathError

FAST = settings(max_examples=200, deadline=None)
SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}

# --- nix32 -------------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=80))
def test_nix32_round_trips(data: bytes) -> None:
    text = nix32.encode(data)
    assert len(text) == nix32.encoded_length(len(data))
    assert set(text) <= set(nix32.ALPHABET)
    assert nix32.decode(text) == data


def test_nix32_known_value() -> None:
    # `nix-hash --type sha256 --to-base32` of sha256("") (from the Nix test suite).
    digest = hashlib.sha256(b"").digest()
    assert nix32.encode(digest) == "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"


@FAST
@given(st.text(max_size=60))
def test_nix32_decode_is_canonical_or_rejects(text: str) -> None:
    # Every accepted text is the one encoding of its bytes: no aliasing of hashes.
    try:
        data = nix32.decode(text)
    except nix32.Nix32Error:
        return
    assert nix32.encode(data) == text


@pytest.mark.parametrize("text", [
    "e" * 52, "o" * 52, "u" * 52, "t" * 52,  # letters Nix left out of its alphabet
    "0" * 51, "0" * 54, "A" * 52,             # wrong length / case
    "z" + "0" * 51,                           # bits beyond 32 bytes
])
def test_nix32_rejects_invalid_text(text: str) -> None:
    with pytest.raises(nix32.Nix32Error):
        nix32.decode(text)


# --- hashes --------------------------------------------------------------------------------

hashes = st.sampled_from(sorted(SIZES)).flatmap(
    lambda algo: st.binary(min_size=SIZES[algo], max_size=SIZES[algo]).map(
        lambda d: Hash(algo, d)))


@FAST
@given(hashes)
def test_hash_parses_nix32_hex_and_sri(h: Hash) -> None:
    assert Hash.parse(str(h)) == h
    assert Hash.parse(f"{h.algo}:{nix32.encode(h.digest)}") == h
    assert Hash.parse(f"{h.algo}:{h.digest.hex()}") == h
    assert Hash.parse(f"{h.algo}-{base64.b64encode(h.digest).decode()}") == h


@FAST
@given(st.text(max_size=140))
def test_hash_parse_rejects_with_hash_error_only(text: str) -> None:
    with contextlib.suppress(HashError):
        h = Hash.parse(text)
        assert len(h.digest) == SIZES[h.algo]


@pytest.mark.parametrize("text", [
    "sha256:", "sha256", "md4:" + "0" * 32, "sha256:" + "0" * 51, "sha256:" + "g" * 64,
    "sha256-" + base64.b64encode(b"x" * 31).decode(), "sha256-!!!", "sha1:" + "e" * 32,
])
def test_hash_rejects_invalid_text(text: str) -> None:
    with pytest.raises(HashError):
        Hash.parse(text)


# --- store paths ---------------------------------------------------------------------------

hash_parts = st.text(nix32.ALPHABET, min_size=32, max_size=32)
name_chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?="
store_names = st.tuples(st.sampled_from(name_chars.replace(".", "")),
                        st.text(name_chars, max_size=40)).map("".join)
store_paths = st.builds(StorePath, hash_parts, store_names)


@FAST
@given(store_paths)
def test_store_path_round_trips(sp: StorePath) -> None:
    assert StorePath.parse(sp.path()) == sp
    assert StorePath.from_base_name(sp.base_name) == sp
    assert StorePath.parse(sp.path("/other/store"), "/other/store") == sp


@FAST
@given(st.text(max_size=80))
def test_store_path_parse_raises_only_store_path_error(text: str) -> None:
    for candidate in (text, "/nix/store/" + text):
        with contextlib.suppress(StorePathError):
            sp = StorePath.parse(candidate)
            assert sp.path() == candidate


@pytest.mark.parametrize("path", [
    "/nix/store/" + "0" * 32,                      # no name
    "/nix/store/" + "0" * 32 + "-",                # empty name
    "/nix/store/" + "0" * 32 + "-.hidden",         # leading dot
    "/nix/store/" + "0" * 32 + "-a/b",             # slash
    "/nix/store/" + "0" * 32 + "-a b",             # space
    "/nix/store/" + "0" * 32 + "-" + "a" * 212,    # too long
    "/nix/store/" + "e" * 32 + "-x",               # not nix32
    "/nix/store/" + "0" * 31 + "-x",               # short hash
    "/nix/store/../etc/passwd", "/etc/passwd", "nix/store/" + "0" * 32 + "-x",
])
def test_store_path_rejects_invalid_paths(path: str) -> None:
    with pytest.raises(StorePathError):
        StorePath.parse(path)


# --- narinfo -------------------------------------------------------------------------------

# Values are single-line printable ASCII (what narinfos carry), stripped as the parser strips.
tokens = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                 max_size=30)
words = st.lists(tokens, min_size=1, max_size=3).map(" ".join)
extra_keys = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", min_size=1,
                     max_size=10).filter(lambda k: k not in narinfo._KNOWN and k != "Sig")
sizes = st.integers(0, 10**18)


@st.composite
def narinfos(draw: st.DrawFn) -> NarInfo:
    compression = draw(st.sampled_from(sorted(COMPRESSIONS)))
    nar_hash = draw(hashes)
    file_hash = draw(st.none() | hashes)
    if compression == "none" and file_hash is None:
        file_hash = nar_hash  # the parser fills it in: an uncompressed file is the NAR
    return NarInfo(
        store_path=draw(store_paths),
        url=draw(tokens),
        compression=compression,
        nar_hash=nar_hash,
        nar_size=draw(sizes),
        file_hash=file_hash,
        file_size=draw(st.none() | sizes),
        references=tuple(draw(st.lists(store_paths, max_size=4))),
        deriver=draw(st.none() | tokens),
        sigs=tuple(draw(st.lists(tokens, max_size=3))),
        ca=draw(st.none() | words),
        extra=tuple(draw(st.lists(st.tuples(extra_keys, words), max_size=3))),
    )


@FAST
@given(narinfos())
def test_narinfo_parse_of_render_is_identity(info: NarInfo) -> None:
    text = info.render()
    assert narinfo.parse(text) == info
    assert narinfo.parse(text).render() == text


@FAST
@given(st.text(max_size=400))
def test_narinfo_arbitrary_text_raises_only_narinfo_error(text: str) -> None:
    with contextlib.suppress(NarInfoError):
        narinfo.parse(text)


@FAST
@given(narinfos(), st.data())
def test_narinfo_with_a_damaged_line_raises_only_narinfo_error(
        info: NarInfo, data: st.DataObject) -> None:
    lines = info.render().splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    key = lines[i].partition(": ")[0]
    lines[i] = f"{key}: {data.draw(st.text(max_size=20))}"
    with contextlib.suppress(NarInfoError):
        narinfo.parse("\n".join(lines))


def test_narinfo_keeps_unknown_fields_like_system() -> None:
    text = (f"StorePath: /nix/store/{'0' * 32}-x\nURL: nar/a.nar\nCompression: none\n"
            f"NarHash: sha256:{'1' * 52}\nNarSize: 8\nReferences: \nSystem: x86_64-linux\n")
    assert "System: x86_64-linux" in narinfo.parse(text).render()


@pytest.mark.parametrize("text,message", [
    ("StorePath: /nix/store/x\n", "missing field"),
    ("garbage\n", "not 'Key: value'"),
    ("NarSize: \u00b2\n", "not a size"),
    ("NarSize: \u0661\n", "not a size"),  # Arabic-Indic digit one: isdigit(), not ASCII
    ("URL: a\nURL: b\n", "duplicate field"),
    ("X" * (narinfo.MAX_NARINFO_BYTES + 1), "too large"),
])
def test_narinfo_errors_are_clear(text: str, message: str) -> None:
    base = (f"StorePath: /nix/store/{'0' * 32}-x\nURL: u\nNarHash: sha256:{'1' * 52}\n"
            "NarSize: 1\n")
    # Each case overrides or breaks one field of an otherwise valid narinfo.
    body = text if "StorePath" in text or "X" * 10 in text else _override(base, text)
    with pytest.raises(NarInfoError, match=message):
        narinfo.parse(body)


def _override(base: str, text: str) -> str:
    keys = {line.partition(":")[0] for line in text.splitlines()}
    kept = [line for line in base.splitlines() if line.partition(":")[0] not in keys]
    return "\n".join(kept) + "\n" + text
