"""Streaming decompression of NAR files, with bounded output per step."""

import bz2
import lzma
import zlib
from collections.abc import Iterator
from typing import Protocol

import zstandard

# Cap what one step may inflate to, so a tiny chunk of a highly compressible NAR cannot
# balloon memory.
MAX_STEP_OUTPUT = 1 << 20


class UnsupportedCompression(ValueError):
    pass


class Decoder(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]: ...
    def finish(self) -> Iterator[bytes]: ...
    @property
    def complete(self) -> bool: ...


class _Identity:
    complete = True

    def feed(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data

    def finish(self) -> Iterator[bytes]:
        return iter(())


class _Stdlib:
    """lzma, bz2 and zlib share one decompressor interface (max_length, needs_input, eof)."""

    def __init__(self, obj: "lzma.LZMADecompressor | bz2.BZ2Decompressor") -> None:
        self._d = obj

    @property
    def complete(self) -> bool:
        return self._d.eof

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._d.eof:
            if data:
                raise ValueError("data after the end of the compressed stream")
            return
        out = self._d.decompress(data, max_length=MAX_STEP_OUTPUT)
        yield out
        while not self._d.eof and not self._d.needs_input:
            yield self._d.decompress(b"", max_length=MAX_STEP_OUTPUT)

    def finish(self) -> Iterator[bytes]:
        return iter(())


class _Zlib:
    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)

    @property
    def complete(self) -> bool:
        return self._d.eof

    def feed(self, data: bytes) -> Iterator[bytes]:
        buf = data
        while True:
            out = self._d.decompress(buf, MAX_STEP_OUTPUT)
            yield out
            buf = self._d.unconsumed_tail
            if not buf:
                return

    def finish(self) -> Iterator[bytes]:
        yield self._d.flush()


class _Zstd:
    """One decompressor per frame: a NAR may be several concatenated frames (pzstd), and a
    stream is complete only at the end of a frame."""

    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._seen = False

    @property
    def complete(self) -> bool:
        return self._seen and self._d.eof

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            self._seen = True
            if self._d.eof:
                self._d = zstandard.ZstdDecompressor().decompressobj()
            yield self._d.decompress(data)
            data = self._d.unused_data if self._d.eof else b""

    def finish(self) -> Iterator[bytes]:
        return iter(())


def decoder(compression: str) -> Decoder:
    if compression == "none":
        return _Identity()
    if compression == "xz":
        return _Stdlib(lzma.LZMADecompressor())
    if compression == "bzip2":
        return _Stdlib(bz2.BZ2Decompressor())
    if compression == "gzip":
        return _Zlib()
    if compression == "zstd":
        return _Zstd()
    raise UnsupportedCompression(f"compression {compression!r} is not supported")
