"""The scenarios, and the registry `--scenario` picks from.

Each scenario measures one path of the agent for one --recompress mode, on agents of its own,
and compares it with its baselines in interleaved rounds (compare.interleave): every ratio is
the median of per-round ratios, with their range. Adding a scenario is one function and one
entry in SCENARIOS.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from loadtest import cluster
from loadtest import load as ld
from loadtest.baselines import Nginx
from loadtest.compare import Sample, Target, Variant, cpu_per_request_us, values
from loadtest.http import Target as Server
from loadtest.procstat import CpuMeter, HiccupMeter, RssSampler
from loadtest.report import Measurement, percentiles
from loadtest.runner import Run, Scenario
from tests.support.agent import AgentProcess
from tests.support.nixenv import hash_part

MIB = 1024 * 1024
Pids = Callable[[], Iterable[int]]
NO_PIDS: Pids = list
Measured = TypeVar("Measured")


def agent_pids(agent: AgentProcess) -> Pids:
    assert agent.proc is not None
    pid = agent.proc.pid
    return lambda: [pid]


# --- warm start: a pod whose closure the agent holds -----------------------------------------


async def warm_start(r: Run, mode: str) -> None:
    """A cold node realises the ml closure from a warm agent, as the overlay configures the
    node's Nix (the agent's store read as file:// first, its HTTP URL for misses), and through
    the HTTP listener alone; vs file:// uncompressed (the local limit), file:// on the agent's
    store and nginx serving the agent's store (the same bytes over the same protocol)."""
    ml = r.envs.ml
    agent = await r.warm_agent(mode, ml.roots, ml.paths, "warm start")
    try:
        with Nginx([agent.store], r.opts.nginx_workers) as nginx:
            store = f"file://{agent.store.resolve()}"
            nginx_url = f"http://127.0.0.1:{nginx.targets[agent.store.resolve()][0].port}"

            def realise(subs: list[str], server: Pids | None, what: str) -> Variant:
                async def one() -> Sample:
                    before = _agent_requests(agent)
                    with CpuMeter(server or NO_PIDS) as cpu:
                        c = await ld.nix_realises(subs, ml.roots[0], r.keys, r.nodes("warm"))
                    r.check(c, f"warm start, {what} ({mode})")
                    return Sample(c.wall_s, cpu.seconds if server else None, len(ml.paths),
                                  {"client_cpu_s": c.client_cpu_s,
                                   "agent_requests": _agent_requests(agent) - before})
                return one

            res = await r.interleave({
                "file": realise([f"file://{r.caches.uncompressed.resolve()}"], None, "file"),
                "store": realise([store], None, "file:// agent store"),
                "nginx": realise([nginx_url], nginx.pids, "nginx"),
                "agent": realise([agent.url], agent_pids(agent), "agent HTTP"),
                "overlay": realise([store, agent.url], agent_pids(agent), "overlay"),
            }, warmup=True)
    finally:
        r.stop(agent)
    _warm_start_rows(r, mode, res)


WARM_NAMES = {"file": "file:// uncompressed", "store": "file:// agent's store",
              "nginx": "nginx on agent's store", "agent": "agent HTTP",
              "overlay": "overlay config (file:// agent's store, then agent HTTP)"}


def _warm_start_rows(r: Run, mode: str, res: dict[str, list[Sample]]) -> None:
    ml = r.envs.ml
    closure = {"paths": len(ml.paths), "nar_bytes": ml.total_nar_size}
    for name, base, target in (
            ("overlay", "file", Target("<=", 1.1, True, "<= 1.1x file:// uncompressed")),
            ("agent", "nginx", Target("<=", 1.1, True, "<= 1.1x nginx")),
            ("agent", "file", None), ("store", "file", None), ("nginx", "store", None)):
        r.add(Measurement("warm start", f"ml: {WARM_NAMES[name]}", values(res[name]), "s",
                          better="lower", transport="tcp" if name != "store" else None,
                          recompress=mode, baseline_name=WARM_NAMES[base],
                          baseline_samples=values(res[base]), target=target,
                          details={"closure": closure, "runs": _runs(res[name]),
                                   "baseline_runs": _runs(res[base])}))
    client = {k: [float(s.details["client_cpu_s"]) for s in v]  # type: ignore[arg-type]
              for k, v in res.items()}
    r.add(Measurement("warm start", "ml: Nix client CPU, agent HTTP",
                      client["agent"], "s", better="lower", transport="tcp", recompress=mode,
                      baseline_name="nginx on agent's store",
                      baseline_samples=client["nginx"]))
    _cpu_row(r, "warm start", "ml: server CPU per path (narinfo + NAR)",
             res["agent"], res["nginx"], "tcp", mode)
    # Misses fall through to the agent; a warm agent's store answers everything else.
    r.add(Measurement("warm start", "ml: overlay config: requests that reached the agent",
                      [float(s.details["agent_requests"]) for s in res["overlay"]], "req",  # type: ignore[arg-type]
                      better="lower", transport="tcp", recompress=mode,
                      baseline_name="agent HTTP alone",
                      baseline_samples=[float(s.details["agent_requests"])  # type: ignore[arg-type]
                                        for s in res["agent"]]))


def _agent_requests(agent: AgentProcess) -> float:
    """Requests the agent's TCP listener has answered so far (its own metric)."""
    return agent.metric("flox_node_cache_http_requests_total", listener="tcp")


def _runs(samples: list[Sample]) -> list[dict[str, object]]:
    """What each run cost: the server's CPU (None for file://; the agent's, for the overlay:
    what the store directory did not answer) and the Nix client's."""
    return [{"server_cpu_s": s.cpu_s, **s.details} for s in samples]


def _cpu_row(r: Run, scenario: str, name: str, ours: list[Sample], theirs: list[Sample],
             transport: str, mode: str, baseline: str = "nginx") -> None:
    a, n = cpu_per_request_us(ours), cpu_per_request_us(theirs)
    if a is not None and n is not None:
        r.add(Measurement(scenario, name, a, "µs CPU", better="lower", transport=transport,
                          recompress=mode, baseline_name=baseline, baseline_samples=n))


# --- cold start: a pod whose closure nobody holds ---------------------------------------------


async def cold_start(r: Run, mode: str) -> None:
    """A cold node realises the ml closure through a fresh agent vs straight from the
    upstream."""
    ml = r.envs.ml

    async def direct() -> Sample:
        c = await ld.nix_realises([r.up.url], ml.roots[0], r.keys, r.nodes("direct"))
        r.check(c, "cold start, direct from upstream")
        return Sample(c.wall_s, details={"client_cpu_s": c.client_cpu_s})

    async def through_agent() -> Sample:
        agent = r.agent(mode)
        try:
            with CpuMeter(agent_pids(agent)) as cpu:
                c = await ld.nix_realises([agent.url], ml.roots[0], r.keys, r.nodes("cold"))
        finally:
            r.stop(agent)
        r.check(c, f"cold start through a cold agent ({mode})")
        return Sample(c.wall_s, cpu.seconds, len(ml.paths), {"client_cpu_s": c.client_cpu_s})

    res = await r.interleave({"direct": direct, "agent": through_agent})
    r.add(Measurement("cold start", "ml: through a cold agent", values(res["agent"]), "s",
                      better="lower", transport="tcp", recompress=mode,
                      baseline_name="direct from upstream",
                      baseline_samples=values(res["direct"])))
    if (cpu := cpu_per_request_us(res["agent"])) is not None:
        r.add(Measurement("cold start", "ml: agent CPU per path (fetch, verify, serve, "
                          "re-encode)", cpu, "µs CPU", better="lower", transport="tcp",
                          recompress=mode))


# --- narinfo storms --------------------------------------------------------------------------


def _served(pids: Pids, measure: Callable[[], Measured | Awaitable[Measured]],
            figure: Callable[[Measured], float], requests: Callable[[Measured], int],
            hiccups: bool = False) -> Variant:
    """A variant that runs `measure` against a server and charges it the server's CPU; with
    `hiccups`, the machine's own wake-up lateness meanwhile is in its details (`host_late_ms`)."""
    async def one() -> Sample:
        with CpuMeter(pids) as cpu, ld.gc_paused(), \
                HiccupMeter() if hiccups else contextlib.nullcontext() as host:
            m = measure()
            if inspect.isawaitable(m):
                m = await m
        details: dict[str, object] = {"result": m}
        if host is not None:
            details["host_late_ms"] = percentiles(host.late_ms)
        return Sample(figure(m), cpu.seconds, requests(m), details)
    return one


async def narinfo(r: Run, mode: str) -> None:
    """narinfo lookups of every path, over TCP and the Unix socket, vs nginx serving the
    upstream's files: sequential on one keep-alive connection (a Nix client's query loop),
    concurrent over many, and latency at a fixed open-loop rate."""
    envs = r.envs
    agent = await r.warm_agent(mode, envs.web.roots + envs.ml.roots, envs.all_paths, "narinfo")
    hashes = [hash_part(p) for p in envs.all_paths]
    secs, conns, rate = r.opts.storm_seconds, r.opts.storm_connections, r.opts.open_loop_rate
    try:
        with Nginx([r.caches.upstream], r.opts.nginx_workers) as nginx:
            for ours, theirs in zip(ld.agent_targets(agent),
                                    nginx.targets[r.caches.upstream.resolve()], strict=True):
                variants: dict[str, Variant] = {}
                for who, target, pids in (("agent", ours, agent_pids(agent)),
                                          ("nginx", theirs, nginx.pids)):
                    variants[f"seq {who}"] = _storm(pids, lambda t=target: (
                        ld.storm_sequential(t, hashes, secs)))
                    variants[f"con {who}"] = _storm(pids, lambda t=target: (
                        ld.storm_concurrent(t, hashes, conns, secs)))
                    variants[f"ol {who}"] = _storm(pids, lambda t=target: (
                        ld.storm_open_loop(t, hashes, rate, secs)), hiccups=True)
                res = await r.interleave(variants, label=ours.transport)
                _narinfo_rows(r, mode, ours.transport, res)
    finally:
        r.stop(agent)


def _storm(pids: Pids, measure: Callable[[], ld.Storm | Awaitable[ld.Storm]],
           hiccups: bool = False) -> Variant:
    return _served(pids, measure, lambda m: m.rate, lambda m: m.requests, hiccups)


def _storms(samples: list[Sample]) -> list[ld.Storm]:
    return [s.details["result"] for s in samples]  # type: ignore[misc]


def _narinfo_rows(r: Run, mode: str, transport: str, res: dict[str, list[Sample]]) -> None:
    def add(name: str, kind: str, pick: Callable[[ld.Storm], float], unit: str,
            target: Target | None, better: str = "higher") -> None:
        a, n = _storms(res[f"{kind} agent"]), _storms(res[f"{kind} nginx"])
        errors = sum(s.errors for s in a)
        if errors:
            r.notes.append(f"narinfo {name} ({transport}, {mode}): {errors} non-200")
        r.add(Measurement("narinfo", name, [pick(s) for s in a], unit, better=better,  # type: ignore[arg-type]
                          transport=transport, recompress=mode, baseline_name="nginx",
                          baseline_samples=[pick(s) for s in n], target=target,
                          details={"agent": [s.__dict__ for s in a],
                                   "nginx": [s.__dict__ for s in n]}))

    rate, p99 = (lambda s: s.rate), (lambda s: s.latencies_ms["p99"])
    add("1 keep-alive connection: rate", "seq", rate, "req/s",
        Target(">=", 0.7, True, ">= 0.7x nginx"))
    add("1 keep-alive connection: p99", "seq", p99, "ms", None, "lower")
    _cpu_row(r, "narinfo", "1 keep-alive connection: server CPU per request",
             res["seq agent"], res["seq nginx"], transport, mode)
    conns = r.opts.storm_connections
    add(f"{conns} connections: rate", "con", rate, "req/s", None)
    _cpu_row(r, "narinfo", f"{conns} connections: server CPU per request",
             res["con agent"], res["con nginx"], transport, mode)
    add(f"p99 at {r.opts.open_loop_rate:,.0f} req/s open loop", "ol", p99, "ms",
        Target("<=", 2.0, text="p99 < 2 ms"), "lower")
    # No server answers sooner than the machine wakes it: a p99 here near the target's means
    # the target cannot be judged on this machine.
    host = [s.details["host_late_ms"]["p99"] for kind in ("ol agent", "ol nginx")  # type: ignore[index]
            for s in res[kind]]
    r.add(Measurement("narinfo", "the machine's own lateness waking a 1 ms sleep, p99, "
                      "during the open loops", host, "ms", better="lower", transport=transport,
                      recompress=mode))


# --- NAR throughput --------------------------------------------------------------------------


async def throughput(r: Run, mode: str) -> None:
    """Every NAR of the ml closure from a warm agent, over 1 and 16 connections, TCP and the
    Unix socket, vs nginx serving the agent's own store directory (the same files)."""
    agent = await r.warm_agent(mode, r.envs.ml.roots, r.envs.ml.paths, "NAR throughput")
    files = ld.agent_nar_files(agent, r.envs.ml.paths)
    try:
        with Nginx([agent.store], r.opts.nginx_workers) as nginx:
            for ours, theirs in zip(ld.agent_targets(agent),
                                    nginx.targets[agent.store.resolve()], strict=True):
                variants: dict[str, Variant] = {}
                for conns in (1, 16):
                    for who, target, pids in (("agent", ours, agent_pids(agent)),
                                              ("nginx", theirs, nginx.pids)):
                        variants[f"{conns} {who}"] = _served(
                            pids, lambda t=target, c=conns: ld.nar_throughput(
                                t, files, c, r.opts.throughput_seconds),
                            lambda m: m.bytes_per_s, lambda m: m.passes * len(files))
                res = await r.interleave(variants, label=ours.transport)
                _throughput_rows(r, mode, ours.transport, res, len(files))
    finally:
        r.stop(agent)


def _throughput_rows(r: Run, mode: str, transport: str, res: dict[str, list[Sample]],
                     files: int) -> None:
    for conns in (1, 16):
        a = [s.details["result"] for s in res[f"{conns} agent"]]
        n = [s.details["result"] for s in res[f"{conns} nginx"]]
        if errors := sum(t.errors for t in a):  # type: ignore[attr-defined]
            r.notes.append(f"NAR throughput ({transport}, {conns}, {mode}): {errors} non-200")
        r.add(Measurement("NAR throughput", f"ml closure, {conns} connection(s)",
                          [t.bytes_per_s / MIB for t in a], "MiB/s",  # type: ignore[attr-defined]
                          transport=transport, recompress=mode,
                          baseline_name="nginx (agent's store dir)",
                          baseline_samples=[t.bytes_per_s / MIB for t in n],  # type: ignore[attr-defined]
                          target=Target(">=", 0.9, True, ">= 0.9x nginx") if conns == 16
                          else None,
                          details={"agent": [t.__dict__ for t in a],
                                   "nginx": [t.__dict__ for t in n], "files": files}))
        _cpu_row(r, "NAR throughput", f"{conns} connection(s): server CPU per NAR",
                 res[f"{conns} agent"], res[f"{conns} nginx"], transport, mode)


# --- N clients at once -----------------------------------------------------------------------


async def clients(r: Run, mode: str) -> None:
    """N cold nodes realise the web closure at once: straight from the upstream, through a
    fresh (cold) agent, then through the same agent again (warm); upstream NAR requests per
    unique NAR."""
    n, web = r.opts.clients, r.envs.web
    live: list[AgentProcess] = []

    def realise(what: str, url: Callable[[], str]) -> Variant:
        async def one() -> Sample:
            r.up.reset_counts()
            c = await ld.nix_realises([url()], web.roots[0], r.keys, r.nodes(what), n)
            r.check(c, f"{n} clients, {what} ({mode})")
            usage = ld.upstream_usage(r.up, r.caches, web.paths)
            if what == "warm agent":
                r.stop(live.pop())
            return Sample(c.wall_s, details={"usage": usage, "client_s": c.client_s})
        return one

    def fresh_agent_url() -> str:
        live.append(r.agent(mode))
        return live[-1].url

    try:
        res = await r.interleave({
            "direct": realise("direct", lambda: r.up.url),
            "cold agent": realise("cold agent", fresh_agent_url),
            "warm agent": realise("warm agent", lambda: live[-1].url),
        })
    finally:
        for agent in live:
            r.stop(agent)

    def per_nar(samples: list[Sample]) -> list[float]:
        return [s.details["usage"]["nar_requests_per_unique_nar"] for s in samples]  # type: ignore[index]

    for phase, goal in (("cold agent", Target("<=", 1.0, text="= 1.00")),
                        ("warm agent", Target("<=", 0.0, text="= 0"))):
        r.add(Measurement("N clients", f"{n} clients web, {phase}: wall", values(res[phase]),
                          "s", better="lower", transport="tcp", recompress=mode,
                          baseline_name="direct from upstream",
                          baseline_samples=values(res["direct"]),
                          details={"client_s": [s.details["client_s"] for s in res[phase]]}))
        r.add(Measurement("N clients", f"{n} clients web, {phase}: upstream NAR requests per "
                          "unique NAR", per_nar(res[phase]), "req/NAR", better="lower",
                          transport="tcp", recompress=mode, target=goal,
                          details={"usage": [s.details["usage"] for s in res[phase]]}))


# --- rollout ---------------------------------------------------------------------------------


async def rollout(r: Run, mode: str) -> None:
    """A fresh agent is prewarmed with the web environment (POST /v1/prewarm), then N pods
    start at once: no upstream request during their start."""
    n, web = r.opts.clients, r.envs.web
    prewarm_s, pods_s, nar_requests = [], [], []
    for _ in range(r.opts.repeats):
        agent = r.agent(mode)
        try:
            r.up.reset_counts()
            t0 = time.perf_counter()
            state = await ld.prewarm(agent, web.roots, timeout=900)
            prewarm_s.append(time.perf_counter() - t0)
            if state.get("state") != "succeeded":
                r.notes.append(f"rollout: prewarm ended {state}")
            r.up.reset_counts()
            c = await ld.nix_realises([agent.url], web.roots[0], r.keys, r.nodes("pods"), n)
            r.check(c, f"rollout pods ({mode})")
            pods_s.append(c.wall_s)
            nar_requests.append(float(ld.upstream_usage(r.up, r.caches, web.paths)
                                      ["nar_requests"]))
        finally:
            r.stop(agent)
    r.add(Measurement("rollout", "prewarm web", prewarm_s, "s", better="lower",
                      recompress=mode))
    r.add(Measurement("rollout", f"{n} pods start after prewarm: wall", pods_s, "s",
                      better="lower", transport="tcp", recompress=mode))
    r.add(Measurement("rollout", f"{n} pods: upstream NAR requests during start", nar_requests,
                      "req", better="lower", recompress=mode, target=Target("<=", 0, text="= 0")))


# --- peak RSS --------------------------------------------------------------------------------


async def rss(r: Run, mode: str) -> None:
    """Peak RSS of a fresh agent while many clients stream the ml closure through it (cold:
    stream-through from the upstream, the path that holds transfers in flight)."""
    agent = r.agent(mode)
    try:
        assert agent.proc is not None
        n = r.opts.rss_clients
        with RssSampler(agent.proc.pid) as s:
            res = await asyncio.to_thread(ld.stream_clients, Server(port=agent.port),
                                     r.envs.ml.paths, n, 900)
        hwm = s.hwm_kib
    finally:
        r.stop(agent)
    size = r.envs.ml.total_nar_size
    r.add(Measurement("RSS", f"agent peak RSS, {n} clients streaming the ml closure "
                      f"({size / MIB:,.0f} MiB NAR)", [s.peak_kib / 1024], "MiB",
                      better="lower", transport="tcp", recompress=mode,
                      target=Target("<=", 200, text="< 200 MB (on >= 1 GB)"),
                      details={"vm_hwm_mib": hwm / 1024, "closure_nar_bytes": size,
                               "closure_ge_1gb": size >= 1 << 30, **res}))
    if res["errors"]:
        r.notes.append(f"RSS clients ({mode}): {res['errors']} errors")


# The default run goes in this order: the quick scenarios first, the long `clients` last.
SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("warm-start", "a warm node's cold start (ml): as the overlay configures the node "
             "and through the agent's HTTP alone, vs file:// uncompressed, file:// on the "
             "agent's store and nginx on the agent's store", warm_start),
    Scenario("narinfo", "narinfo lookups: 1 keep-alive connection, many connections, p99 at a "
             "fixed open-loop rate; TCP and Unix; vs nginx", narinfo),
    Scenario("throughput", "every NAR of ml over 1 and 16 connections; TCP and Unix; vs nginx "
             "on the agent's store", throughput),
    Scenario("cold-start", "ml through a fresh agent vs straight from the upstream", cold_start),
    Scenario("rss", "peak RSS while many clients stream ml through a cold agent", rss),
    Scenario("rollout", "prewarm (POST /v1/prewarm), then N pods start: 0 upstream requests",
             rollout),
    Scenario("pod-start", "pods start on a node whose Nix store the agent realised the closure "
             "into (real nix-daemon, untrusted client) vs warm agent, file://, upstream",
             cluster.pod_start),
    Scenario("peer-rollout", "a rollout to --nodes nodes x --pods-per-node pods, without then "
             "with peers: upstream bytes per closure byte and wall time",
             cluster.peer_rollout),
    Scenario("clients", "N nodes at once (web): direct, cold agent, warm agent; upstream "
             "requests per unique NAR", clients),
)}
