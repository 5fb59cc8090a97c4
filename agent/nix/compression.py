"""Streaming decompression of NAR files, with bounded output per step.

Every decoder inflates what it is fed in pieces of at most MAX_STEP_OUTPUT bytes, made one at a
time as the caller consumes them, so a small chunk of a highly compressible NAR (a 1 GiB file of
zeros is a few kB of zstd) never becomes one huge buffer. Concatenated streams (pzstd's frames,
`cat a.xz b.xz`) decode as one, as Nix and the codecs' own tools accept them.
"""

import bz2
import lzma
import zlib
from collections.abc import Callable, Iterator
from typing import Protocol

import zstandard

MAX_STEP_OUTPUT = 1 << 20
# What one decoder may hold: its window (xz's dictionary, zstd's window). xz -9 needs 65 MiB and
# zstd up to windowLog 26 (level 22 without --long) 64 MiB; a stream whose header asks for more
# (xz allows 1.5 GiB, zstd --long=31 2 GiB) is refused instead of allocated.
DECODER_MEMORY_LIMIT = 80 << 20


class UnsupportedCompression(ValueError):
    pass


class TooMuchMemory(ValueError):
    """A stream whose header asks for a window larger than DECODER_MEMORY_LIMIT."""

    def __init__(self, compression: str) -> None:
        super().__init__(f"{compression} stream needs more than "
                         f"{DECODER_MEMORY_LIMIT >> 20} MiB to decode")


class Decoder(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]: ...
    def finish(self) -> Iterator[bytes]: ...
    @property
    def complete(self) -> bool: ...


class _Identity:
    complete = True

    def feed(self, data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), MAX_STEP_OUTPUT):
            yield data[i:i + MAX_STEP_OUTPUT]

    def finish(self) -> Iterator[bytes]:
        return iter(())


class _Stdlib:
    """lzma and bz2 share one decompressor interface (max_length, needs_input, eof)."""

    def __init__(self, new: Callable[[], "lzma.LZMADecompressor | bz2.BZ2Decompressor"]) -> None:
        self._new = new
        self._d = new()

    @property
    def complete(self) -> bool:
        return self._d.eof

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data or not (self._d.eof or self._d.needs_input):
            if self._d.eof:  # another stream follows
                self._d = self._new()
            try:
                out = self._d.decompress(data, max_length=MAX_STEP_OUTPUT)
            except lzma.LZMAError as e:
                if str(e) == "Memory usage limit exceeded":
                    raise TooMuchMemory("xz") from None
                raise
            data = self._d.unused_data if self._d.eof else b""
            if out:
                yield out

    def finish(self) -> Iterator[bytes]:
        return iter(())


class _Gzip:
    """zlib keeps what max_length left undone in unconsumed_tail, to be fed again."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)

    @property
    def complete(self) -> bool:
        return self._d.eof

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._d.eof:  # another member follows
                self._d = zlib.decompressobj(wbits=31)
            out = self._d.decompress(data, MAX_STEP_OUTPUT)
            data = self._d.unused_data if self._d.eof else self._d.unconsumed_tail
            if out:
                yield out

    def finish(self) -> Iterator[bytes]:
        # With all input consumed, at most the rest of one match (258 bytes) is pending.
        if out := self._d.flush():
            yield out


# RFC 8878 §3.1.1.2: a block inflates to at most 128 KiB; one step takes the input of this many
# whole blocks plus the start of the next (a partial raw block inflates to no more than its input).
BLOCK_MAX = 128 << 10
STEP_BLOCKS = MAX_STEP_OUTPUT // BLOCK_MAX - 1
ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC = 0x184D2A5  # the top 28 bits


class _ZstdWalk:
    """Follows the frame and block headers of a zstd stream as bytes pass, to tell where blocks
    and frames end. libzstd still decodes (and checks) every byte."""

    def __init__(self) -> None:
        self.frames = 0  # frames ended so far
        self._head = bytearray()
        self._checksum = 0
        self._expect(4, self._magic)

    @property
    def between_frames(self) -> bool:
        return self._parse == self._magic and not self._head

    def advance(self, data: memoryview, pos: int) -> tuple[int, str | None]:
        """Passes bytes from pos up to the next block or frame end (or the end of data): the
        position reached and what ended there, "block", "frame" or None."""
        while pos < len(data):
            if self._skip:
                n = min(self._skip, len(data) - pos)
                pos, self._skip = pos + n, self._skip - n
                event = None if self._skip else self._then()
            else:
                n = min(self._need - len(self._head), len(data) - pos)
                self._head += data[pos:pos + n]
                pos += n
                if len(self._head) < self._need:
                    break
                head = bytes(self._head)
                self._head.clear()
                event = self._parse(head)
            if event:
                return pos, event
        return pos, None

    def _expect(self, n: int, parse: Callable[[bytes], str | None]) -> None:
        self._need, self._parse, self._skip = n, parse, 0

    def _pass(self, n: int, then: Callable[[], str | None]) -> str | None:
        """Skip n bytes the walk need not read, then continue with `then`."""
        if n == 0:
            return then()
        self._skip, self._then = n, then
        return None

    def _magic(self, head: bytes) -> None:
        magic = int.from_bytes(head, "little")
        if magic == ZSTD_MAGIC:
            self._expect(1, self._descriptor)
        elif magic >> 4 == SKIPPABLE_MAGIC:
            self._expect(4, self._skippable)
        else:
            raise ValueError("not a zstd frame")

    def _skippable(self, head: bytes) -> str | None:
        return self._pass(int.from_bytes(head, "little"), self._frame_end)

    def _descriptor(self, head: bytes) -> str | None:
        fhd = head[0]
        single = fhd >> 5 & 1
        self._checksum = 4 if fhd & 4 else 0
        # Window descriptor, dictionary id and content size, by the descriptor's flags.
        rest = (1 - single) + (0, 1, 2, 4)[fhd & 3] + (single, 2, 4, 8)[fhd >> 6]
        return self._pass(rest, self._next_block)

    def _next_block(self) -> None:
        self._expect(3, self._block)

    def _block(self, head: bytes) -> str | None:
        header = int.from_bytes(head, "little")
        last, kind, size = header & 1, header >> 1 & 3, header >> 3
        if kind == 3 or size > BLOCK_MAX:
            raise ValueError("invalid zstd block header")
        return self._pass(1 if kind == 1 else size, self._last_block if last else self._block_end)

    def _block_end(self) -> str:
        self._next_block()
        return "block"

    def _last_block(self) -> str:
        if not self._checksum:
            return self._frame_end()
        self._pass(self._checksum, self._frame_end)
        return "block"

    def _frame_end(self) -> str:
        self.frames += 1
        self._expect(4, self._magic)
        return "frame"


class _Zstd:
    """zstandard's decompressobj inflates all it can in one call, so it is fed at most
    STEP_BLOCKS blocks at a time, and one frame per decompressobj (pzstd writes several)."""

    def __init__(self) -> None:
        self._zstd = zstandard.ZstdDecompressor(max_window_size=DECODER_MEMORY_LIMIT)
        self._walk = _ZstdWalk()
        self._d: zstandard.ZstdDecompressionObj | None = None

    @property
    def complete(self) -> bool:
        return self._walk.frames > 0 and self._walk.between_frames

    def feed(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        start = pos = blocks = 0
        while pos < len(view):
            pos, event = self._walk.advance(view, pos)
            blocks += event == "block"
            if event == "frame" or blocks == STEP_BLOCKS or pos == len(view):
                if out := self._inflate(view[start:pos], frame_end=event == "frame"):
                    yield out
                start, blocks = pos, 0

    def _inflate(self, data: memoryview, frame_end: bool) -> bytes:
        if self._d is None:
            self._d = self._zstd.decompressobj()
        try:
            out = self._d.decompress(data)
        except zstandard.ZstdError as e:
            if "too much memory" in str(e):
                raise TooMuchMemory("zstd") from None
            raise
        if self._d.eof != frame_end:
            raise ValueError("zstd frame ends where its headers do not say")
        if frame_end:
            self._d = None
        return out

    def finish(self) -> Iterator[bytes]:
        return iter(())


def decoder(compression: str) -> Decoder:
    if compression == "none":
        return _Identity()
    if compression == "xz":
        return _Stdlib(lambda: lzma.LZMADecompressor(memlimit=DECODER_MEMORY_LIMIT))
    if compression == "bzip2":
        return _Stdlib(bz2.BZ2Decompressor)
    if compression == "gzip":
        return _Gzip()
    if compression == "zstd":
        return _Zstd()
    raise UnsupportedCompression(f"compression {compression!r} is not supported")
