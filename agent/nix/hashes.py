"""Nix hash strings: `sha256:<nix32>`, `sha256:<hex>` or SRI `sha256-<base64>`."""

import base64
import binascii
import hashlib
from dataclasses import dataclass

from agent.nix import nix32

_SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


class HashError(ValueError):
    pass


@dataclass(frozen=True)
class Hash:
    algo: str
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> "Hash":
        if ":" in text:
            algo, _, rest = text.partition(":")
        elif "-" in text:
            algo, _, rest = text.partition("-")
            return cls._checked(algo, _b64(rest))
        else:
            raise HashError(f"hash {text!r} has no algorithm prefix")
        size = _SIZES.get(algo)
        if size is None:
            raise HashError(f"unsupported hash algorithm {algo!r}")
        if len(rest) == nix32.encoded_length(size):
            try:
                return cls._checked(algo, nix32.decode(rest))
            except nix32.Nix32Error as e:
                raise HashError(f"bad nix32 hash {text!r}: {e}") from None
        if len(rest) == 2 * size:
            try:
                return cls._checked(algo, bytes.fromhex(rest))
            except ValueError:
                raise HashError(f"bad hex hash {text!r}") from None
        return cls._checked(algo, _b64(rest))

    @classmethod
    def _checked(cls, algo: str, digest: bytes) -> "Hash":
        if _SIZES.get(algo) != len(digest):
            raise HashError(f"{algo} digest has {len(digest)} bytes")
        return cls(algo, digest)

    @property
    def nix32(self) -> str:
        return nix32.encode(self.digest)

    def __str__(self) -> str:
        return f"{self.algo}:{self.nix32}"


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HashError(f"bad base64 hash {text!r}") from None


def sha256(data: bytes) -> Hash:
    return Hash("sha256", hashlib.sha256(data).digest())
