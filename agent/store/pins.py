"""Who keeps which paths (pins), and the environments the store has prefetched.

A pin holder ("env:owner/env", "pod:ns/name", ...) protects the closure it names from eviction.
An environment row records a prefetched target's closure, so a restart can resume it and
`status` can say how much of it is present.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass

from agent.store.index import EnvironmentRow, Index


@dataclass(frozen=True)
class EnvironmentReport:
    ref: str
    generation: int | None
    system: str | None
    paths: int
    paths_present: int
    closure_bytes: int
    present_bytes: int
    pinned_by: tuple[str, ...]
    updated: float
    walked: bool  # `paths` counts the whole closure, not only the roots of an unfinished walk
    prefetching: bool = False  # a job is walking it: until it ends `paths` may be its roots only

    @property
    def complete(self) -> bool:
        return self.walked and not self.prefetching and self.paths_present == self.paths

    def to_json(self) -> dict[str, object]:
        return {"ref": self.ref, "generation": self.generation, "system": self.system,
                "paths": self.paths, "paths_present": self.paths_present,
                "closure_bytes": self.closure_bytes, "present_bytes": self.present_bytes,
                "complete": self.complete, "prefetching": self.prefetching,
                "pinned_by": list(self.pinned_by),
                "updated": self.updated}


class Pins:
    def __init__(self, index: Index) -> None:
        self._index = index

    # --- pins ------------------------------------------------------------------------------

    def replace(self, holder: str, hashes: Iterable[str]) -> None:
        """`holder` now keeps exactly these paths."""
        self._index.pin(holder, hashes)

    def add(self, holder: str, hashes: Iterable[str]) -> None:
        self._index.pin_add(holder, hashes)

    def release(self, holder: str) -> bool:
        """Drop every pin of `holder`; False if it held none."""
        return self._index.unpin(holder)

    def holders_of(self, hashes: Iterable[str]) -> set[str]:
        return self._index.holders_of(hashes)

    def holders(self) -> dict[str, int]:
        """Pinned paths per holder."""
        return self._index.pin_holders()

    def pinned_bytes(self) -> int:
        return self._index.pinned_bytes()

    # --- environments ----------------------------------------------------------------------

    def record_environment(self, ref: str, generation: int | None, system: str | None,
                           closure: Iterable[str], *, walked: bool) -> None:
        """`walked`: `closure` is the whole closure (a walk that ended without failures), not
        only its roots."""
        paths = tuple(closure)
        total, _ = self._index.closure_bytes(paths)
        self._index.save_environment(EnvironmentRow(ref, generation, system, paths, total,
                                                    time.time(), walked))

    def environments(self) -> list[EnvironmentRow]:
        return self._index.environments()

    def environment(self, ref: str) -> EnvironmentRow | None:
        return next((e for e in self._index.environments() if e.ref == ref), None)

    def holders_of_environment(self, env: EnvironmentRow) -> set[str]:
        """Who pins an environment: its root path is pinned by every holder of the closure."""
        return self._index.holders_of(env.closure[:1])

    def is_complete(self, env: EnvironmentRow) -> bool:
        return env.walked and len(self._index.present(env.closure)) == len(env.closure)

    def reports(self) -> list[EnvironmentReport]:
        out = []
        for env in self._index.environments():
            present = self._index.present(env.closure)
            total, done = self._index.closure_bytes(env.closure)
            out.append(EnvironmentReport(
                env.ref, env.generation, env.system, len(env.closure), len(present), total,
                done, tuple(sorted(self.holders_of_environment(env))), env.updated,
                env.walked))
        return out
