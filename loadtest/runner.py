"""One loadtest invocation: closures, caches and the upstream, then the chosen scenarios for each
--recompress mode. What a scenario needs (fresh agents, warm agents, scratch directories, the
results list) is here; the scenarios themselves are in scenarios.py."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import closures
from loadtest import load as ld
from loadtest.closures import Caches, Environments, Profile
from loadtest.compare import Sample, Variant, interleave
from loadtest.procstat import StealMeter
from loadtest.report import Measurement
from tests.support.agent import AgentProcess
from tests.support.upstream import UpstreamServer

STEAL_NOTE = 0.03  # a scenario during which the host took more CPU than this gets a note


@dataclass
class Options:
    profile: Profile
    workdir: Path
    modes: list[str]
    repeats: int
    latency: float
    bandwidth: float | None
    clients: int
    rss_clients: int
    storm_seconds: float
    storm_connections: int
    open_loop_rate: float
    nginx_workers: int
    xz_level: int
    settle_limit: float
    nodes_dir: Path = Path("/dev/shm/flox-loadtest")  # the cold nodes' fresh stores
    throughput_seconds: float = 3.0  # each NAR throughput sample: whole passes for this long
    nodes: int = 4           # peer-rollout: agents, each on its own loopback address
    pods_per_node: int = 2


@dataclass
class Run:
    opts: Options
    envs: Environments
    caches: Caches
    up: UpstreamServer
    out: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each scenario
    steal: dict[str, float] = field(default_factory=dict)  # the host's share of CPU, each
    # ... and in each round of each scenario's comparisons (`interleave`), by their labels
    round_steal: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    scenario: str = ""  # the one running

    @property
    def keys(self) -> list[str]:
        return [self.caches.public_key]

    def add(self, m: Measurement) -> None:
        self.out.append(m)

    async def interleave(self, variants: Mapping[str, Variant], warmup: bool = False,
                         label: str = "") -> dict[str, list[Sample]]:
        """compare.interleave for --repeats rounds, keeping each round's host steal under the
        running scenario and `label` (which of its comparisons this is, if it has several)."""
        rounds = self.round_steal.setdefault(self.scenario, {}).setdefault(label, [])
        return await interleave(variants, self.opts.repeats, warmup, steal=rounds)

    def tmp(self, name: str) -> Path:
        """A fresh directory under the workdir (agent stores, tokens)."""
        return _fresh_dir(self.opts.workdir / "tmp", name)

    def nodes(self, name: str) -> Path:
        """A fresh directory for the stores of cold nodes (Nix clients), under --nodes-dir."""
        return _fresh_dir(self.opts.nodes_dir, name)

    def agent(self, mode: str) -> AgentProcess:
        """A fresh (cold) agent with an empty store."""
        return AgentProcess(self.tmp(f"agent-{mode}"), [self.up.url], self.keys,
                            "--recompress", mode, "--log-level", "info").start()

    def stop(self, agent: AgentProcess) -> None:
        """Stop an agent and free its store's disk space."""
        agent.stop()
        shutil.rmtree(agent.workdir, ignore_errors=True)

    def check(self, c: ld.Copies, what: str) -> None:
        if c.failures:
            self.notes.append(f"{what}: {c.failures} Nix client failures: {c.first_error}")

    async def warm_agent(self, mode: str, roots: list[str], paths: list[str],
                         scenario: str) -> AgentProcess:
        """A fresh agent holding the closures of `roots` (prewarmed through its admin API) and
        serving `paths` re-encoded as `mode` says (bounded wait, --settle-limit)."""
        agent = self.agent(mode)
        try:
            state = await ld.prewarm(agent, roots, timeout=900)
            if state.get("state") != "succeeded":
                self.notes.append(f"{scenario}: prewarm ended {state}")
            settle = ld.settle_recompression(agent, paths, mode, self.opts.settle_limit)
        except BaseException:
            self.stop(agent)
            raise
        if mode != "none" and not settle.get("all_reencoded"):
            self.notes.append(f"{scenario} (--recompress {mode}): not every narinfo served "
                              f"re-encoded after {settle['settle_s']} s: {settle['compressions']}")
        self.add(Measurement(scenario, "time until narinfos are served re-encoded",
                             [float(settle["settle_s"])], "s", better="lower",  # type: ignore[arg-type]
                             recompress=mode, details=settle))
        return agent


def steal_notes(name: str, steal: float, rounds: dict[str, list[float]]) -> list[str]:
    """What the host's steal says about a scenario's figures: over the whole scenario, and the
    rounds of its comparisons (by label, numbered from 1) it disturbed."""
    notes = []
    if steal > STEAL_NOTE:
        notes.append(f"{name}: the host took {steal:.0%} of this machine's CPU time (steal): "
                     "its figures measure the neighbours as much as the servers; rerun when "
                     "quiet")
    disturbed = [f"{label} round {i} ({s:.1%})".lstrip()
                 for label, steal_of in rounds.items()
                 for i, s in enumerate(steal_of, 1) if s > STEAL_NOTE]
    if disturbed:
        total = sum(map(len, rounds.values()))
        notes.append(f"{name}: host steal above {STEAL_NOTE:.0%} in {len(disturbed)} of "
                     f"{total} rounds: {', '.join(disturbed)}")
    return notes


def _fresh_dir(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))


@dataclass(frozen=True)
class Scenario:
    """One entry of the registry: a name for --scenario, a line for --help, and a function
    that measures it for one --recompress mode, on agents of its own."""

    name: str
    summary: str
    run: Callable[[Run, str], Awaitable[None]]


def prepare(opts: Options) -> tuple[Environments, Caches]:
    opts.workdir.mkdir(parents=True, exist_ok=True)
    envs = closures.build(opts.workdir, opts.profile)
    return envs, closures.publish(opts.workdir, envs, opts.xz_level)


async def run(opts: Options, envs: Environments, caches: Caches, scenarios: list[Scenario],
              done: Callable[[Run], None] = lambda r: None) -> Run:
    """Run `scenarios` for every mode; `done` sees the results after each one (so an
    interrupted long run keeps what it measured)."""
    with UpstreamServer(caches.upstream, latency=opts.latency, bandwidth=opts.bandwidth) as up:
        r = Run(opts, envs, caches, up)
        try:
            for mode in opts.modes:
                for s in scenarios:
                    started, name = time.monotonic(), f"{s.name} ({mode})"
                    r.scenario = name
                    with StealMeter() as steal:
                        await s.run(r, mode)
                    r.seconds[name] = round(time.monotonic() - started, 1)
                    r.steal[name] = round(steal.fraction, 3)
                    r.notes += steal_notes(name, steal.fraction, r.round_steal.get(name, {}))
                    done(r)
        finally:
            shutil.rmtree(opts.workdir / "tmp", ignore_errors=True)
            with contextlib.suppress(OSError):  # each node's store is gone already
                opts.nodes_dir.rmdir()
    return r
