"""The agent's GC roots in the node's store: `<dir>/<holder id>/<store path name>`.

Each holder (a pod, a prewarm, an environment pin) has its own subdirectory, marked by a
`.holder` file with the holder's name and when it was first planned (the budget drops the
oldest first). Only directories carrying that marker are ever touched, so a mistaken
--node-gcroots-dir cannot remove anybody else's roots. The link names are store path base
names; the daemon follows them (indirect roots) in the host's filesystem, so the directory
has the same path on the host and in the agent's container.
"""

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = ".holder"


@dataclass
class HolderRoots:
    holder: str
    dir: Path
    since: float
    links: dict[str, str] = field(default_factory=dict)  # link name -> store path


def holder_id(holder: str) -> str:
    """A file name for `holder`: readable, unique, no slashes."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", holder)[:48]
    return f"{readable}-{hashlib.sha256(holder.encode()).hexdigest()[:12]}"


class RootsDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    def link(self, holder: str, store_path: str) -> Path:
        return self.path / holder_id(holder) / Path(store_path).name

    def plan(self, holder: str) -> float:
        """Make `holder`'s directory exist; return since when it has been planned."""
        d = self.path / holder_id(holder)
        marker = d / MARKER
        try:
            return float(json.loads(marker.read_text())["since"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        d.mkdir(parents=True, exist_ok=True)
        since = time.time()
        tmp = d / f"{MARKER}.tmp"
        tmp.write_text(json.dumps({"holder": holder, "since": since}))
        tmp.replace(marker)
        return since

    def holders(self) -> dict[str, HolderRoots]:
        """Every holder directory of ours (those with a readable marker), with its links."""
        found: dict[str, HolderRoots] = {}
        if not self.path.is_dir():
            return found
        for d in self.path.iterdir():
            try:
                meta = json.loads((d / MARKER).read_text())
                entry = HolderRoots(str(meta["holder"]), d, float(meta["since"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not ours
            for link in d.iterdir():
                if link.is_symlink():
                    entry.links[link.name] = os.readlink(link)
            found[entry.holder] = entry
        return found

    @staticmethod
    def unlink(entry: HolderRoots, name: str) -> None:
        (entry.dir / name).unlink(missing_ok=True)
        entry.links.pop(name, None)

    @staticmethod
    def remove(entry: HolderRoots) -> None:
        for name in list(entry.links):
            RootsDir.unlink(entry, name)
        (entry.dir / MARKER).unlink(missing_ok=True)
        for leftover in entry.dir.glob(f"{MARKER}.tmp"):
            leftover.unlink(missing_ok=True)
        entry.dir.rmdir()
