"""Streaming verification of a NAR file against its narinfo: FileSize, FileHash, NarSize, NarHash.

Pure computation: the caller feeds bytes as they arrive (off the event loop: hashing and
decompression are CPU work) and calls `finish()` before trusting any of them.
"""

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.nix.compression import TooMuchMemory, UnsupportedCompression, decoder
from agent.nix.hashes import Hash
from agent.nix.nar import ListingReader, NarFormatError
from agent.nix.narinfo import NarInfo


class VerificationError(Exception):
    """Bytes that do not match what the signed narinfo promises. `reason` labels metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Expected:
    """What a NAR file must match, as its signed narinfo states it. The file fields may be
    unknown (an upstream narinfo without FileHash/FileSize): then they are measured."""

    compression: str
    nar_hash: Hash
    nar_size: int
    file_hash: Hash | None = None
    file_size: int | None = None

    @classmethod
    def of(cls, info: NarInfo) -> "Expected":
        return cls(info.compression, info.nar_hash, info.nar_size, info.file_hash,
                   info.file_size)


class NarVerifier:
    def __init__(self, info: Expected, *, listing: bool = False) -> None:
        """listing: also build the NAR's `.ls` listing from the decoded bytes."""
        self.info = info
        self._listing: ListingReader | None = ListingReader() if listing else None
        self.file_size = 0
        self.nar_size = 0
        # Always hash the file: a narinfo without FileHash gets one when the store re-renders it.
        self._file_hasher = hashlib.new(info.file_hash.algo if info.file_hash else "sha256")
        self._nar_hasher = hashlib.new(info.nar_hash.algo)
        try:
            self._decoder = decoder(info.compression)
        except UnsupportedCompression as e:
            raise VerificationError("compression", str(e)) from None

    def update(self, chunk: bytes) -> None:
        self.file_size += len(chunk)
        if self.info.file_size is not None and self.file_size > self.info.file_size:
            raise VerificationError("file_size", f"more than FileSize {self.info.file_size} bytes")
        self._file_hasher.update(chunk)
        self._inflate(self._decoder.feed(chunk))

    def _inflate(self, outputs: Iterator[bytes]) -> None:
        """Count, hash and list what the decoder gives; its failures are verification errors."""
        try:
            for out in outputs:
                self._nar(out)
        except VerificationError:
            raise
        except TooMuchMemory as e:
            raise VerificationError("decompress", str(e)) from None
        except Exception as e:  # every codec raises its own error type on corrupt input
            raise VerificationError("decompress", f"corrupt {self.info.compression} data: {e}")\
                from None

    def _nar(self, data: bytes) -> None:
        self.nar_size += len(data)
        if self.nar_size > self.info.nar_size:
            raise VerificationError("nar_size", f"NAR larger than NarSize {self.info.nar_size}")
        self._nar_hasher.update(data)
        if self._listing is not None:
            try:
                self._listing.feed(data)
            except NarFormatError:  # the hashes decide validity; only the listing is lost
                self._listing = None

    def finish(self) -> None:
        info = self.info
        self._inflate(self._decoder.finish())
        if info.file_size is not None and self.file_size != info.file_size:
            raise VerificationError(
                "file_size", f"got {self.file_size} bytes, FileSize is {info.file_size}")
        if info.file_hash and self._file_hasher.digest() != info.file_hash.digest:
            got = Hash(info.file_hash.algo, self._file_hasher.digest())
            raise VerificationError("file_hash", f"FileHash is {info.file_hash}, got {got}")
        if not self._decoder.complete:
            raise VerificationError("truncated", f"{info.compression} stream ends early")
        if self.nar_size != info.nar_size:
            raise VerificationError(
                "nar_size", f"NAR has {self.nar_size} bytes, NarSize is {info.nar_size}")
        if self._nar_hasher.digest() != info.nar_hash.digest:
            got = Hash(info.nar_hash.algo, self._nar_hasher.digest())
            raise VerificationError("nar_hash", f"NarHash is {info.nar_hash}, got {got}")

    def listing(self) -> dict[str, Any] | None:
        """The NAR's listing, after `finish()`; None when not asked for or not parseable."""
        if self._listing is None:
            return None
        try:
            return self._listing.result()
        except NarFormatError:
            return None

    def file_hash(self) -> Hash:
        """The hash of the file bytes fed so far."""
        return Hash(self._file_hasher.name, self._file_hasher.digest())
