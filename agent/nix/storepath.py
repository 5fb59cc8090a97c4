"""Store paths (`/nix/store/<hash>-<name>`) and their 32-character nix32 hash parts."""

import re
from dataclasses import dataclass

from agent.nix.nix32 import ALPHABET

STORE_DIR = "/nix/store"
HASH_LEN = 32
HASH_RE = re.compile(f"[{ALPHABET}]{{{HASH_LEN}}}")
# Nix allows these characters in names; a name never starts with a dot.
_NAME_RE = re.compile(r"[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,210}")


class StorePathError(ValueError):
    pass


def is_hash_part(text: str) -> bool:
    return HASH_RE.fullmatch(text) is not None


@dataclass(frozen=True, order=True)
class StorePath:
    hash_part: str
    name: str

    @classmethod
    def parse(cls, text: str, store_dir: str = STORE_DIR) -> "StorePath":
        prefix = store_dir.rstrip("/") + "/"
        if not text.startswith(prefix):
            raise StorePathError(f"{text!r} is not in {store_dir}")
        return cls.from_base_name(text[len(prefix):])

    @classmethod
    def from_base_name(cls, base: str) -> "StorePath":
        hash_part, dash, name = base.partition("-")
        if not dash or not is_hash_part(hash_part):
            raise StorePathError(f"{base!r} is not <32-char nix32 hash>-<name>")
        if not _NAME_RE.fullmatch(name):
            raise StorePathError(f"{base!r} has an invalid name")
        return cls(hash_part, name)

    @property
    def base_name(self) -> str:
        return f"{self.hash_part}-{self.name}"

    def path(self, store_dir: str = STORE_DIR) -> str:
        return f"{store_dir.rstrip('/')}/{self.base_name}"

    def __str__(self) -> str:
        return self.path()
