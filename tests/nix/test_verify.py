"""The streaming verifier and decoders, over real NAR files Nix published (xz, zstd, none)."""

import bz2
import gzip
import hashlib
import itertools
import lzma
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.nix import narinfo
from agent.nix.compression import DECODER_MEMORY_LIMIT, MAX_STEP_OUTPUT, Decoder, decoder
from agent.nix.hashes import Hash
from agent.nix.narinfo import NarInfo
from agent.nix.verify import Expected, NarVerifier, VerificationError
from tests.support.nixenv import Closure, hash_part, publish

FAST = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
COMPRESSIONS = ("xz", "zstd", "none")


@pytest.fixture(scope="module")
def nar_files(nix_workdir: Path, signing_key: tuple[Path, str],
              small_closure: Closure) -> dict[str, list[tuple[NarInfo, bytes]]]:
    """Per compression: (narinfo, file bytes) of the small closure's mid-sized paths."""
    out: dict[str, list[tuple[NarInfo, bytes]]] = {}
    # Skip the 200 kB path: hypothesis feeds each file many times.
    paths = [p for p in small_closure.paths if small_closure.nar_sizes[p] < 100_000]
    for comp in COMPRESSIONS:
        cache = nix_workdir / f"verify-cache-{comp}"
        if not cache.exists():
            publish(small_closure.roots, cache, signing_key[0], comp)
        out[comp] = []
        for path in paths:
            info = narinfo.parse((cache / f"{hash_part(path)}.narinfo").read_text())
            out[comp].append((info, (cache / info.url).read_bytes()))
    return out


def _feed(info: NarInfo, data: bytes, cuts: list[int]) -> None:
    v = NarVerifier(Expected.of(info))
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for a, b in itertools.pairwise(bounds):
        v.update(data[a:b])
    v.finish()


@pytest.mark.parametrize("comp", COMPRESSIONS)
@FAST
@given(cuts=st.lists(st.integers(0, 1 << 20), max_size=12))
def test_any_chunking_of_a_real_nar_verifies(
        nar_files: dict[str, list[tuple[NarInfo, bytes]]], comp: str, cuts: list[int]) -> None:
    for info, data in nar_files[comp]:
        _feed(info, data, cuts)


@pytest.mark.parametrize("comp", COMPRESSIONS)
@FAST
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7),
       cuts=st.lists(st.integers(0, 1 << 20), max_size=4))
def test_any_flipped_bit_fails_verification(
        nar_files: dict[str, list[tuple[NarInfo, bytes]]], comp: str, where: float, bit: int,
        cuts: list[int]) -> None:
    for info, data in nar_files[comp]:
        i = int(where * len(data))
        bad = data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:]
        with pytest.raises(VerificationError):
            _feed(info, bad, cuts)


@pytest.mark.parametrize("comp", COMPRESSIONS)
@FAST
@given(keep=st.floats(0, 1, exclude_max=True), extra=st.binary(min_size=1, max_size=9))
def test_truncated_or_extended_files_fail_verification(
        nar_files: dict[str, list[tuple[NarInfo, bytes]]], comp: str, keep: float,
        extra: bytes) -> None:
    for info, data in nar_files[comp]:
        with pytest.raises(VerificationError) as e:
            _feed(info, data[:int(keep * len(data))], [])
        assert e.value.reason in ("file_size", "file_hash", "truncated", "nar_size", "nar_hash",
                                  "decompress")
        with pytest.raises(VerificationError):
            _feed(info, data + extra, [])


def test_file_hash_check_without_file_size() -> None:
    """Without FileSize the FileHash still catches a short file (narinfos may omit it)."""
    raw = b"x" * 100
    from agent.nix.hashes import sha256
    from agent.nix.storepath import StorePath
    info = NarInfo(StorePath("0" * 32, "x"), "u", "none", sha256(raw), len(raw),
                   file_hash=sha256(raw))
    _feed(info, raw, [10])
    with pytest.raises(VerificationError, match=r"NarSize|FileHash"):
        _feed(info, raw[:-1], [])


def _pzstd(data: bytes) -> bytes:
    """A frame as pzstd writes it: a skippable frame (holding the frame's size), then a
    checksummed zstd frame."""
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    return (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") \
        + len(frame).to_bytes(4, "little") + frame


COMPRESSORS = {"xz": lzma.compress, "bzip2": bz2.compress, "gzip": gzip.compress, "zstd": _pzstd}


def _decode(d: Decoder, chunks: Iterable[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        yield from d.feed(chunk)
    yield from d.finish()


@pytest.mark.parametrize("comp", sorted(COMPRESSORS))
@settings(max_examples=40, deadline=None)
@given(parts=st.lists(st.binary(max_size=5000) | st.just(b"\0" * 3_000_000), min_size=1,
                      max_size=3),
       cuts=st.lists(st.integers(0, 1 << 22), max_size=6))
def test_decoders_round_trip_in_any_chunking(comp: str, parts: list[bytes],
                                             cuts: list[int]) -> None:
    """Concatenated streams (pzstd's frames, `cat a.xz b.xz`) decode as one."""
    packed = b"".join(COMPRESSORS[comp](part) for part in parts)
    d = decoder(comp)
    bounds = [0, *sorted(c % (len(packed) + 1) for c in cuts), len(packed)]
    out = bytearray()
    for piece in _decode(d, (packed[a:b] for a, b in itertools.pairwise(bounds))):
        assert len(piece) <= MAX_STEP_OUTPUT
        out += piece
    assert d.complete
    assert bytes(out) == b"".join(parts)


@pytest.mark.parametrize("comp", sorted(COMPRESSORS))
def test_a_truncated_stream_is_not_complete(comp: str) -> None:
    packed = COMPRESSORS[comp](bytes(range(256)) * 40)
    d = decoder(comp)
    # Cut inside the last frame (a zstd stream cut between frames is complete at the codec
    # level; NarSize and NarHash catch that).
    for _ in d.feed(packed[:-3]):
        pass
    try:
        list(d.finish())
    except Exception:
        return  # gzip's flush may raise on a cut stream: also a failure to complete
    assert not d.complete


ZEROS = 256 << 20
FAST_PACK = {"xz": lambda d: lzma.compress(d, preset=0), "bzip2": lambda d: bz2.compress(d, 1),
             "gzip": lambda d: gzip.compress(d, 1), "zstd": zstandard.compress}


@pytest.mark.parametrize("comp", sorted(FAST_PACK))
def test_one_step_inflates_to_a_bounded_size(comp: str) -> None:
    """256 MiB of zeros, fed as one chunk (a few kB of zstd), still comes out in pieces of at
    most MAX_STEP_OUTPUT, and every byte of it."""
    zeros = bytes(ZEROS)
    packed, expected = FAST_PACK[comp](zeros), hashlib.sha256(zeros).digest()
    del zeros
    digest, size, largest = hashlib.sha256(), 0, 0
    d = decoder(comp)
    for piece in _decode(d, [packed]):
        digest.update(piece)
        size, largest = size + len(piece), max(largest, len(piece))
    assert (size, digest.digest(), d.complete) == (ZEROS, expected, True)
    assert largest <= MAX_STEP_OUTPUT


def test_an_uncompressed_chunk_comes_out_in_bounded_pieces() -> None:
    data = bytes(range(256)) * (10 << 12)
    pieces = list(_decode(decoder("none"), [data]))
    assert max(map(len, pieces)) <= MAX_STEP_OUTPUT and b"".join(pieces) == data



def _xz_declaring(dict_size_props: int, data: bytes) -> bytes:
    """An xz stream of `data` whose block header declares another LZMA2 dictionary size
    (the props byte: 2 or 3 << (props // 2 + 11) bytes), its header CRC32 fixed up."""
    packed = bytearray(lzma.compress(data, filters=[{"id": lzma.FILTER_LZMA2,
                                                     "dict_size": 1 << 20}]))
    header = 12  # after the stream header: size byte, flags, filter id 0x21, props size 1
    assert packed[header:header + 5] == bytes([2, 0, 0x21, 1, 16])
    packed[header + 4] = dict_size_props
    packed[header + 8:header + 12] = zlib.crc32(packed[header:header + 8]).to_bytes(4, "little")
    return bytes(packed)


def _zstd_declaring(window_log: int, data: bytes) -> bytes:
    """A zstd frame of `data` whose Window_Descriptor declares 2**window_log bytes."""
    packed = bytearray(zstandard.ZstdCompressor(write_content_size=False).compress(data))
    assert packed[4] == 0  # frame header descriptor: not single-segment, so a window byte
    packed[5] = (window_log - 10) << 3
    return bytes(packed)


@pytest.mark.parametrize(("comp", "packed", "fits"), [
    ("xz", _xz_declaring(28, b"nar" * 1000), True),    # 64 MiB: xz -9
    ("xz", _xz_declaring(30, b"nar" * 1000), False),   # 128 MiB
    ("xz", _xz_declaring(40, b"nar" * 1000), False),   # 4 GiB - 1: the format's largest
    ("zstd", _zstd_declaring(26, b"nar" * 1000), True),
    ("zstd", _zstd_declaring(31, b"nar" * 1000), False),
])
def test_a_window_beyond_the_decoder_limit_is_refused_not_allocated(
        comp: str, packed: bytes, fits: bool) -> None:
    nar = b"nar" * 1000
    info = Expected(comp, Hash("sha256", hashlib.sha256(nar).digest()), len(nar))
    v = NarVerifier(info)
    if fits:
        v.update(packed)
        v.finish()
        return
    with pytest.raises(VerificationError) as e:
        v.update(packed)
        v.finish()
    assert e.value.reason == "decompress"
    assert str(e.value) == f"{comp} stream needs more than {DECODER_MEMORY_LIMIT >> 20} MiB " \
        "to decode"
