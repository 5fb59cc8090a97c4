"""Where each file of the store lives. The store root is a valid `file://` binary cache."""

import re
from dataclasses import dataclass
from pathlib import Path

from agent.nix.hashes import Hash
from agent.nix.narinfo import COMPRESSIONS
from agent.nix.nix32 import ALPHABET
from agent.nix.storepath import is_hash_part

_EXTS = "|".join(re.escape(e) for e in COMPRESSIONS.values() if e)
# Only names this store itself writes are ever opened: nix32 hash, ".nar", a known extension.
NAR_FILE_RE = re.compile(f"nar/[{ALPHABET}]{{52}}\\.nar(?:{_EXTS})?")


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def tmp(self) -> Path:
        return self.root / ".tmp"

    @property
    def index(self) -> Path:
        return self.root / ".index.sqlite"

    @property
    def floxhub(self) -> Path:
        return self.root / ".floxhub"

    @property
    def nar_dir(self) -> Path:
        return self.root / "nar"

    @property
    def listing_dir(self) -> Path:
        return self.root / "ls"

    def listing(self, nar_hash: Hash) -> Path:
        """A NAR's `.ls` listing, shared by every narinfo and encoding of the same NAR."""
        return self.listing_dir / f"{nar_hash.nix32}.ls"

    @property
    def cache_info(self) -> Path:
        return self.root / "nix-cache-info"

    def narinfo(self, hash_part: str) -> Path:
        if not is_hash_part(hash_part):
            raise ValueError(f"not a store path hash: {hash_part!r}")
        return self.root / f"{hash_part}.narinfo"

    def nar_path(self, name: str) -> Path:
        return Path(self.nar_file_path(name))

    def nar_file_path(self, name: str) -> str:
        """A NAR file's path as a string: the serving path opens one per request, and building
        a Path costs more than the open."""
        if not is_nar_file(name):
            raise ValueError(f"not a NAR file name: {name!r}")
        return f"{self.root}/{name}"

    def create(self) -> None:
        for d in (self.root, self.tmp, self.nar_dir, self.listing_dir):
            d.mkdir(parents=True, exist_ok=True)


def is_nar_file(name: str) -> bool:
    return NAR_FILE_RE.fullmatch(name) is not None


def nar_file_name(file_hash: Hash, compression: str) -> str:
    """Nix's own naming: nar/<FileHash in nix32>.nar<ext>."""
    return f"nar/{file_hash.nix32}.nar{COMPRESSIONS[compression]}"
