"""Notice `flox push` to tracked environments, so their new live generation can be prefetched
before the next pod asks for it.

Each round costs one `git ls-remote` per tracked environment; only a moved branch triggers a
fetch and a resolve, and only a changed live generation is handed to `run`'s `on_change`.
"""

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent import metrics
from agent.flox.floxhub import EnvRef, FloxHub, FloxHubError, ResolvedEnv

log = logging.getLogger(__name__)

Key = tuple[str, str]
# A pin holder is named after the ref it pins ("pod:acme/web:7", "env:acme/web",
# "prewarm:<name>:acme/web:7"); one ending in an explicit generation stays on it.
_GENERATION_REF = re.compile(r"[^/:\s]+/[^/:\s]+:\d+$")


def holds_a_generation(holder: str) -> bool:
    """True when `holder` pins an explicit generation: a new live one must not move it."""
    return bool(_GENERATION_REF.search(holder))


@dataclass
class _State:
    commit: str | None = None
    generation: int | None = None
    # False until the first resolve: that one records a baseline instead of a change.
    known: bool = False
    # A change whose on_change failed: delivered again next round.
    pending: ResolvedEnv | None = None


OnChange = Callable[[ResolvedEnv], Awaitable[None]]


class GenerationWatch:
    def __init__(self, floxhub: FloxHub, interval: float) -> None:
        self.floxhub = floxhub
        self.interval = interval
        self._states: dict[Key, _State] = {}

    def follow(self, resolved: ResolvedEnv) -> None:
        """An environment was just resolved: an unpinned ref follows its live generation (an
        explicit `owner/env:N` stays on N)."""
        if resolved.ref.generation is None:
            self.track(resolved.ref.owner, resolved.ref.name, generation=resolved.generation)

    def track(self, owner: str, env: str, *, generation: int | None = None) -> None:
        """Watch owner/env (again). Pass the generation the caller already handled, if any: a
        different live generation at the next check is then a change; without it, the first
        check only records what is live."""
        EnvRef(owner, env)  # validates the names now rather than in every round
        state = self._states.setdefault((owner, env), _State())
        if generation is not None:  # the caller has just handled this one: not a change
            state.generation, state.known = generation, True

    def untrack(self, owner: str, env: str) -> None:
        self._states.pop((owner, env), None)

    def tracked(self) -> set[Key]:
        return set(self._states)

    async def run(self, on_change: OnChange) -> None:
        while True:
            await self.check_once(on_change)
            await asyncio.sleep(self.interval)

    async def check_once(self, on_change: OnChange) -> None:
        keys = list(self._states)
        await asyncio.gather(*(self._check_logged(key, on_change) for key in keys))

    async def _check_logged(self, key: Key, on_change: OnChange) -> None:
        # A FloxHub outage or a failing callback must not stop the watch: retry next round.
        try:
            await self._check(key, on_change)
        except FloxHubError as e:  # expected during outages: the message says it all
            log.warning("generation watch of %s/%s failed; retrying in %gs: %s", *key,
                        self.interval, e)
        except Exception:
            log.exception("generation watch of %s/%s failed; retrying in %gs", *key,
                          self.interval)

    async def _check(self, key: Key, on_change: OnChange) -> None:
        state = self._states.get(key)
        if state is None:
            return
        if state.pending is None:
            commit = await self.floxhub.live_commit(*key)
            if commit is None:
                log.warning("tracked environment %s/%s is not on FloxHub", *key)
                return
            if commit == state.commit:
                return
            resolved = await self.floxhub.resolve(EnvRef(*key))
            self._observe(key, state, resolved)
        if state.pending is not None:
            await on_change(state.pending)
            state.pending = None

    def _observe(self, key: Key, state: _State, resolved: ResolvedEnv) -> None:
        state.commit = resolved.commit
        if state.known and resolved.generation != state.generation:
            log.info("%s/%s: live generation %s -> %d", *key, state.generation,
                     resolved.generation)
            metrics.GENERATION_CHANGES.inc()
            state.pending = resolved
        state.generation, state.known = resolved.generation, True
