"""ed25519 keys and narinfo signatures, written `name:base64` as Nix does."""

import base64
import binascii
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from agent.nix.narinfo import NarInfo


class KeyFormatError(ValueError):
    pass


def _split(text: str, size: int, what: str) -> tuple[str, bytes]:
    name, sep, b64 = text.strip().partition(":")
    if not sep or not name:
        raise KeyFormatError(f"{what} must be NAME:BASE64")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{what} {name!r}: invalid base64") from None
    if len(raw) != size:
        raise KeyFormatError(f"{what} {name!r}: expected {size} bytes, got {len(raw)}")
    return name, raw


@dataclass(frozen=True)
class PublicKey:
    name: str
    key: Ed25519PublicKey

    @classmethod
    def parse(cls, text: str) -> "PublicKey":
        name, raw = _split(text, 32, "public key")
        return cls(name, Ed25519PublicKey.from_public_bytes(raw))

    def to_text(self) -> str:
        raw = self.key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return f"{self.name}:{base64.b64encode(raw).decode()}"

    def verify(self, fingerprint: bytes, sig: str) -> bool:
        try:
            name, raw = _split(sig, 64, "signature")
        except KeyFormatError:
            return False
        if name != self.name:
            return False
        try:
            self.key.verify(raw, fingerprint)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SecretKey:
    name: str
    key: Ed25519PrivateKey

    @classmethod
    def parse(cls, text: str) -> "SecretKey":
        name, raw = _split(text, 64, "secret key")
        # Nix stores seed + public key; the seed is the first half.
        return cls(name, Ed25519PrivateKey.from_private_bytes(raw[:32]))

    @classmethod
    def generate(cls, name: str) -> "SecretKey":
        return cls(name, Ed25519PrivateKey.generate())

    def sign(self, fingerprint: bytes) -> str:
        return f"{self.name}:{base64.b64encode(self.key.sign(fingerprint)).decode()}"

    def public(self) -> PublicKey:
        return PublicKey(self.name, self.key.public_key())

    def to_text(self) -> str:
        seed = self.key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        pub = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return f"{self.name}:{base64.b64encode(seed + pub).decode()}"


def verified_by(info: NarInfo, keys: list[PublicKey]) -> PublicKey | None:
    """The first trusted key that signed `info`, or None."""
    fp = info.fingerprint()
    for key in keys:
        if any(key.verify(fp, sig) for sig in info.sigs):
            return key
    return None


def signature_problem(info: NarInfo, keys: list[PublicKey]) -> str:
    """Why `info` has no valid signature by any of `keys`, in words for people."""
    names = sorted({sig.partition(":")[0] for sig in info.sigs})
    if not names:
        return "not signed"
    trusted = {key.name for key in keys}
    forged = [name for name in names if name in trusted]
    if forged:
        return f"invalid signature by {', '.join(forged)}"
    return f"signed by an untrusted key: {', '.join(names)}"


def add_signature(info: NarInfo, secret: SecretKey) -> NarInfo:
    sig = secret.sign(info.fingerprint())
    others = tuple(s for s in info.sigs if not s.startswith(secret.name + ":"))
    return info.with_sigs((*others, sig))
