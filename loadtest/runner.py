"""One loadtest invocation: closures, caches, upstream, baselines, then per --recompress mode a
fresh agent for each of: cold/warm clients + cold starts + storms + throughput, rollout, RSS."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import closures, node_realise
from loadtest import scenarios as sc
from loadtest.baselines import Nginx
from loadtest.closures import Caches, Environments, Profile
from loadtest.http import Target
from loadtest.report import Measurement
from loadtest.report import Target as Goal
from tests.support.agent import AgentProcess, free_port
from tests.support.upstream import UpstreamServer

MIB = 1024 * 1024
P99_GOAL = Goal("<=", 2.0, text="p99 < 2 ms")


@dataclass
class Options:
    profile: Profile
    workdir: Path
    modes: list[str]
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
    nodes: int = 4
    pods_per_node: int = 2


@dataclass
class Run:
    opts: Options
    envs: Environments
    caches: Caches
    up: UpstreamServer
    out: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    base: dict[str, float] = field(default_factory=dict)  # baseline values by name

    @property
    def keys(self) -> list[str]:
        return [self.caches.public_key]

    def add(self, m: Measurement) -> None:
        self.out.append(m)

    def tmp(self, name: str) -> Path:
        d = self.opts.workdir / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=d))

    def agent(self, mode: str) -> AgentProcess:
        return AgentProcess(self.tmp(f"agent-{mode}"), [self.up.url], self.keys,
                            "--recompress", mode, "--log-level", "info").start()


def prepare(opts: Options) -> tuple[Environments, Caches]:
    opts.workdir.mkdir(parents=True, exist_ok=True)
    envs = closures.build(opts.workdir, opts.profile)
    return envs, closures.publish(opts.workdir, envs, opts.xz_level)


async def run(opts: Options, envs: Environments, caches: Caches) -> Run:
    with UpstreamServer(caches.upstream, latency=opts.latency, bandwidth=opts.bandwidth) as up:
        r = Run(opts, envs, caches, up)
        await baselines(r)
        for mode in opts.modes:
            await main_agent(r, mode)
            await rollout(r, mode)
            rss(r, mode)
        await rollout_nodes(r, opts.modes[0])
        compare_modes(r)
        r.out += await node_realise.pod_starts(r.tmp("node-realise"), up.url,
                                               caches.uncompressed, r.keys,
                                               {"web": envs.web, "ml": envs.ml})
    shutil.rmtree(opts.workdir / "tmp", ignore_errors=True)
    return r


# --- baselines measured once per invocation ------------------------------------------------


async def baselines(r: Run) -> None:
    """The Nix client straight from the upstream, and from a file:// uncompressed cache."""
    web, ml = r.envs.web.roots[0], r.envs.ml.roots[0]
    direct = await sc.nix_copies(r.up.url, ml, r.keys, r.tmp("direct-ml"), 1)
    _check(r, direct, "direct upstream, 1 client")
    r.base["direct_ml_s"] = direct.wall_s
    local = await sc.nix_copies(f"file://{r.caches.uncompressed.resolve()}", ml, r.keys,
                                r.tmp("file-ml"), 1)
    _check(r, local, "file:// uncompressed")
    r.base["file_none_ml_s"] = local.wall_s
    r.up.reset_counts()
    many = await sc.nix_copies(r.up.url, web, r.keys, r.tmp("direct-web"), r.opts.clients)
    _check(r, many, f"direct upstream, {r.opts.clients} clients")
    r.base["direct_web_n_s"] = many.wall_s
    usage = sc.upstream_usage(r.up, r.caches, r.envs.web.paths)
    for name, value, unit in (
            ("cold start ml, direct from upstream", direct.wall_s, "s"),
            ("cold start ml, file:// uncompressed", local.wall_s, "s"),
            (f"{r.opts.clients} clients web, direct from upstream", many.wall_s, "s"),
            (f"{r.opts.clients} clients direct: upstream NAR requests per unique NAR",
             usage["nar_requests_per_unique_nar"], "req/NAR")):
        r.add(Measurement("baseline", name, value, unit, better="lower",
                          details={"usage": usage} if "requests" in name else {}))


def _check(r: Run, c: sc.Copies, what: str) -> None:
    if c.failures:
        r.notes.append(f"{what}: {c.failures} nix copy failures: {c.first_error}")


# --- the main agent: scenarios 1, 2, 3 and the cold starts ---------------------------------


async def main_agent(r: Run, mode: str) -> None:
    agent = r.agent(mode)
    try:
        await cold_and_warm_clients(r, agent, mode)
        await cold_starts(r, agent, mode)
        with Nginx([r.caches.upstream, agent.store], r.opts.nginx_workers) as nginx:
            await narinfo_storms(r, agent, nginx, mode)
            nar_throughput(r, agent, nginx, mode)
    finally:
        agent.stop()


async def cold_and_warm_clients(r: Run, agent: AgentProcess, mode: str) -> None:
    """Scenario 3: N real `nix copy` clients of the web closure, cold agent then warm."""
    n, web = r.opts.clients, r.envs.web
    for phase in ("cold", "warm"):
        r.up.reset_counts()
        c = await sc.nix_copies(agent.url, web.roots[0], r.keys, r.tmp(f"{phase}-web"), n)
        _check(r, c, f"{phase} agent, {n} clients ({mode})")
        usage = sc.upstream_usage(r.up, r.caches, web.paths)
        r.add(Measurement("3 N clients", f"{n} clients web, {phase} agent: wall", c.wall_s, "s",
                          better="lower", transport="tcp", recompress=mode,
                          baseline_name="direct from upstream",
                          baseline_value=r.base["direct_web_n_s"],
                          details={"client_s": c.client_s, "failures": c.failures,
                                   "usage": usage}))
        goal = Goal("<=", 1.0, text="= 1.00") if phase == "cold" else Goal("<=", 0.0,
                                                                            text="= 0")
        r.add(Measurement("3 N clients", f"{n} clients web, {phase} agent: upstream NAR "
                          "requests per unique NAR", usage["nar_requests_per_unique_nar"],
                          "req/NAR", better="lower", transport="tcp", recompress=mode,
                          target=goal, details=usage))
        if phase == "cold":
            settle = sc.settle_recompression(agent, web.paths, mode, r.opts.settle_limit)
            _note_settle(r, mode, "web", settle)


def _note_settle(r: Run, mode: str, closure: str, settle: dict[str, object]) -> None:
    if mode != "none" and not settle.get("effective"):
        r.notes.append(f"--recompress {mode}: no narinfo of the {closure} closure was served "
                       f"re-encoded after {settle['settle_s']} s (served: "
                       f"{settle['compressions']}): the flag has no effect yet")
    r.add(Measurement("recompress", f"{closure}: time until narinfos served re-encoded",
                      float(settle["settle_s"]), "s", better="lower", recompress=mode,  # type: ignore[arg-type]
                      details=settle))


async def cold_starts(r: Run, agent: AgentProcess, mode: str) -> None:
    """One cold node copies the ml closure through the cold agent, then (after re-encoding
    settles) another through the warm agent: vs direct upstream and vs file:// uncompressed."""
    ml = r.envs.ml.roots[0]
    cold = await sc.nix_copies(agent.url, ml, r.keys, r.tmp("cold-ml"), 1)
    _check(r, cold, f"cold start through cold agent ({mode})")
    r.add(Measurement("cold start", "ml closure through a cold agent", cold.wall_s, "s",
                      better="lower", transport="tcp", recompress=mode,
                      baseline_name="direct from upstream", baseline_value=r.base["direct_ml_s"]))
    settle = sc.settle_recompression(agent, r.envs.ml.paths, mode, r.opts.settle_limit)
    _note_settle(r, mode, "ml", settle)
    warm = await sc.nix_copies(agent.url, ml, r.keys, r.tmp("warm-ml"), 1)
    _check(r, warm, f"cold start through warm agent ({mode})")
    r.add(Measurement("cold start", "ml closure through a warm agent (a warm node's cold start)",
                      warm.wall_s, "s", better="lower", transport="tcp", recompress=mode,
                      baseline_name="file:// uncompressed", baseline_value=r.base["file_none_ml_s"],
                      target=Goal("<=", 1.3, on_ratio=True, text="<= 1.3x file://"),
                      details={"served_compressions": settle["compressions"],
                               "closure_nar_bytes": r.envs.ml.total_nar_size}))
    r.base[f"warm_ml_{mode}_s"] = warm.wall_s


async def narinfo_storms(r: Run, agent: AgentProcess, nginx: Nginx, mode: str) -> None:
    """Scenario 1 over TCP and the Unix socket, against nginx serving the upstream's files."""
    hashes = [sc.hash_part(p) for p in r.envs.all_paths]
    secs = r.opts.storm_seconds
    for ours, theirs in zip(sc.agent_targets(agent),
                            nginx.targets[r.caches.upstream.resolve()], strict=True):
        seq_a = sc.storm_sequential(ours, hashes, secs)
        seq_n = sc.storm_sequential(theirs, hashes, secs)
        _storm(r, mode, ours, "sequential, 1 keep-alive connection", seq_a, seq_n,
               Goal(">=", 0.5, on_ratio=True, text=">= 0.5x nginx"))
        conns = r.opts.storm_connections
        con_a = await sc.storm_concurrent(ours, hashes, conns, secs)
        con_n = await sc.storm_concurrent(theirs, hashes, conns, secs)
        _storm(r, mode, ours, f"concurrent, {conns} connections", con_a, con_n, None)
        rate = r.opts.open_loop_rate
        ol_a = await sc.storm_open_loop(ours, hashes, rate, secs)
        ol_n = await sc.storm_open_loop(theirs, hashes, rate, secs)
        r.add(Measurement("1 narinfo storm", f"p99 at {rate:,.0f} req/s open loop",
                          ol_a.latencies_ms["p99"], "ms", better="lower",
                          transport=ours.transport, recompress=mode, baseline_name="nginx",
                          baseline_value=ol_n.latencies_ms["p99"], target=P99_GOAL,
                          details={"agent": ol_a.__dict__, "nginx": ol_n.__dict__}))


def _storm(r: Run, mode: str, target: Target, what: str, a: sc.Storm, n: sc.Storm,
           goal: Goal | None) -> None:
    details = {"agent": a.__dict__, "nginx": n.__dict__}
    r.add(Measurement("1 narinfo storm", f"{what}: rate", a.rate, "req/s",
                      transport=target.transport, recompress=mode, baseline_name="nginx",
                      baseline_value=n.rate, target=goal, details=details))
    r.add(Measurement("1 narinfo storm", f"{what}: p50 / p99 (p99 shown)",
                      a.latencies_ms["p99"], "ms", better="lower", transport=target.transport,
                      recompress=mode, baseline_name="nginx",
                      baseline_value=n.latencies_ms["p99"],
                      details={"agent_p50_ms": a.latencies_ms["p50"],
                               "nginx_p50_ms": n.latencies_ms["p50"]}))
    if a.errors:
        r.notes.append(f"narinfo storm {what} ({target.transport}, {mode}): {a.errors} non-200")


def nar_throughput(r: Run, agent: AgentProcess, nginx: Nginx, mode: str) -> None:
    """Scenario 2: the whole ml closure's NARs from the warm agent vs nginx on its store dir."""
    files = sc.agent_nar_files(agent, r.envs.ml.paths)
    for ours, theirs in zip(sc.agent_targets(agent), nginx.targets[agent.store.resolve()],
                            strict=True):
        for conns in (1, 16):
            a = sc.nar_throughput(ours, files, conns)
            n = sc.nar_throughput(theirs, files, conns)
            goal = Goal(">=", 0.8, on_ratio=True, text=">= 0.8x nginx") if conns == 16 else None
            r.add(Measurement("2 NAR throughput", f"ml closure, {conns} connection(s), warm",
                              a.bytes_per_s / MIB, "MiB/s", transport=ours.transport,
                              recompress=mode, baseline_name="nginx (agent's store dir)",
                              baseline_value=n.bytes_per_s / MIB, target=goal,
                              details={"agent": a.__dict__, "nginx": n.__dict__,
                                       "files": len(files)}))
            if a.errors:
                r.notes.append(f"NAR throughput ({ours.transport}, {conns}, {mode}): "
                               f"{a.errors} non-200")


# --- scenario 4: rollout --------------------------------------------------------------------


async def rollout(r: Run, mode: str) -> None:
    """Prewarm the web environment on a fresh agent, then N pods start at once."""
    agent = r.agent(mode)
    try:
        r.up.reset_counts()
        web = r.envs.web.roots[0]
        t0 = asyncio.get_running_loop().time()
        state = await sc.prewarm(agent, [web], timeout=600)
        if not state.get("api"):
            r.notes.append("rollout: POST /v1/prewarm is not served yet: warmed the agent with "
                           "one `nix copy` instead")
            await sc.nix_copies(agent.url, web, r.keys, r.tmp("prewarm"), 1)
        elif state.get("state") != "succeeded":
            r.notes.append(f"rollout: prewarm ended {state}")
        prewarm_s = asyncio.get_running_loop().time() - t0
        r.add(Measurement("4 rollout", "prewarm web", prewarm_s, "s", better="lower",
                          recompress=mode, details={"prewarm": state, "usage": sc.upstream_usage(
                              r.up, r.caches, r.envs.web.paths)}))
        r.up.reset_counts()
        n = r.opts.clients
        c = await sc.nix_copies(agent.url, web, r.keys, r.tmp("pods"), n)
        _check(r, c, f"rollout pods ({mode})")
        usage = sc.upstream_usage(r.up, r.caches, r.envs.web.paths)
        r.add(Measurement("4 rollout", f"{n} pods start after prewarm: wall", c.wall_s, "s",
                          better="lower", transport="tcp", recompress=mode,
                          baseline_name="direct from upstream",
                          baseline_value=r.base["direct_web_n_s"],
                          details={"client_s": c.client_s, "usage": usage}))
        r.add(Measurement("4 rollout", f"{n} pods: upstream NAR requests during start",
                          usage["nar_requests"], "req", better="lower", recompress=mode,
                          target=Goal("<=", 0, text="= 0")))
    finally:
        agent.stop()


# --- scenario 5: rollout to N nodes, with and without peers --------------------------------


def _nodes(r: Run, mode: str, token: Path | None) -> list[AgentProcess]:
    """N agents, each on its own loopback address (127.0.0.10+i) as on separate nodes; with
    `token`, each knows the others as peers."""
    hosts = [f"127.0.0.{10 + i}" for i in range(r.opts.nodes)]
    peer_ports = [free_port() for _ in hosts]
    peers = [a for h, p in zip(hosts, peer_ports, strict=True)
             for a in ("--peer", f"http://{h}:{p}")] if token else []
    agents: list[AgentProcess] = []
    try:
        for host, port in zip(hosts, peer_ports, strict=True):
            extra = [*peers, "--peer-listen", f"{host}:{port}",
                     "--peer-token-file", str(token)] if token else []
            agents.append(AgentProcess(r.tmp(f"node-{host}"), [r.up.url], r.keys,
                                       "--recompress", mode, "--log-level", "info", *extra,
                                       host=host).start())
    except BaseException:
        for a in agents:
            a.stop()
        raise
    return agents


async def rollout_nodes(r: Run, mode: str) -> None:
    """N cold nodes with M pods each start the web environment at once, without then with
    peers: upstream bytes per closure byte (N without peers, 1 with) and the pods' wall time."""
    n, m = r.opts.nodes, r.opts.pods_per_node
    token = r.tmp("peer-token") / "token"
    token.write_text(secrets.token_hex(32) + "\n")
    wall: dict[bool, float] = {}
    for with_peers in (False, True):
        agents = _nodes(r, mode, token if with_peers else None)
        try:
            r.up.reset_counts()
            t0 = time.perf_counter()
            copies = await asyncio.gather(*(
                sc.nix_copies(a.url, r.envs.web.roots[0], r.keys, r.tmp("pods"), m)
                for a in agents))
            wall[with_peers] = time.perf_counter() - t0
        finally:
            for a in agents:
                a.stop()
        label = "with peers" if with_peers else "no peers"
        for c in copies:
            _check(r, c, f"rollout to {n} nodes, {label}")
        usage = sc.upstream_usage(r.up, r.caches, r.envs.web.paths)
        upstream_bytes = usage["upstream_bytes_per_unique_nar"] * usage["unique_nars"]
        r.add(Measurement(
            "5 rollout to N nodes", f"{n} nodes x {m} pods, {label}: upstream bytes / closure "
            "bytes", upstream_bytes / usage["nar_bytes_unique"], "x", better="lower",
            recompress=mode, details={"usage": usage},
            target=Goal("<=", 1.0, text="= 1.00") if with_peers else None))
    r.add(Measurement("5 rollout to N nodes", f"{n} nodes x {m} pods: wall with peers",
                      wall[True], "s", better="lower", recompress=mode,
                      baseline_name="without peers", baseline_value=wall[False]))


# --- peak RSS ------------------------------------------------------------------------------


def rss(r: Run, mode: str) -> None:
    """Peak RSS of a fresh agent while many clients stream the ml closure through it (cold:
    stream-through from the upstream, the path that holds transfers in flight)."""
    agent = r.agent(mode)
    try:
        assert agent.proc is not None
        n = r.opts.rss_clients
        with sc.RssSampler(agent.proc.pid) as s:
            res = sc.stream_clients(Target(port=agent.port), r.envs.ml.paths, n, timeout=900)
        size = r.envs.ml.total_nar_size
        r.add(Measurement("RSS", f"agent peak RSS, {n} clients streaming the ml closure "
                          f"({size / MIB:,.0f} MiB NAR)", s.peak_kib / 1024, "MiB",
                          better="lower", transport="tcp", recompress=mode,
                          target=Goal("<=", 200, text="< 200 MB (on >= 1 GB)"),
                          details={"vm_hwm_mib": s.hwm_kib / 1024, "closure_nar_bytes": size,
                                   "closure_ge_1gb": size >= 1 << 30, **res}))
        if res["errors"]:
            r.notes.append(f"RSS clients ({mode}): {res['errors']} errors")
    finally:
        agent.stop()


def compare_modes(r: Run) -> None:
    """A real Nix client's cold start from the same warm agent, re-encoded vs not."""
    kept = r.base.get("warm_ml_none_s")
    if kept is None:
        return
    for mode in ("zstd", "uncompressed"):
        value = r.base.get(f"warm_ml_{mode}_s")
        if value is not None:
            r.add(Measurement("recompress", f"warm node's cold start (ml): --recompress {mode} "
                              "vs none", value, "s", better="lower", transport="tcp",
                              recompress=mode, baseline_name="--recompress none",
                              baseline_value=kept))
