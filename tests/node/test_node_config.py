"""The node-config overlay's Nix configuration, read by a real nix-daemon: the agent (and its
hostPath store) win over remote caches whatever they advertise, a pod start succeeds with the
agent down, and the script fails loudly or cleans up as documented."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.node.conftest import admin, eventually
from tests.support.agent import AgentProcess
from tests.support.nixdaemon import NixDaemon, daemon_config, scratch_dir
from tests.support.nixenv import Closure, publish
from tests.support.upstream import UpstreamServer

DAEMONSET = Path(__file__).resolve().parents[2] / "daemonset"
NODE_CONFIG = DAEMONSET / "overlays" / "node-config"   # the entry point: base + component
SCRIPT = DAEMONSET / "components" / "node-config" / "configure-nix.sh"


def configure(conf_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "NIX_CONF_DIR": str(conf_dir), **env}, timeout=30)


@pytest.fixture
def scratch() -> Iterator[Path]:
    with scratch_dir("realise-nodeconf-") as d:
        yield d


@pytest.fixture
def remote(tmp_path: Path, signing_key: tuple[Path, str], small_closure: Closure,
           request: pytest.FixtureRequest) -> Iterator[UpstreamServer]:
    """A remote cache holding the small closure, advertising `Priority: <param>` or none."""
    cache = tmp_path / "remote"
    publish(small_closure.roots, cache, signing_key[0])
    priority = getattr(request, "param", None)
    (cache / "nix-cache-info").write_text(
        "StoreDir: /nix/store\nWantMassQuery: 1\n"
        + (f"Priority: {priority}\n" if priority is not None else ""))
    with UpstreamServer(cache) as server:
        yield server


def node_daemon(workdir: Path, remote: UpstreamServer, key: str, **env: str) -> NixDaemon:
    """A node whose nix.conf lists the remote cache, then the overlay's script ran on it."""
    daemon = NixDaemon(workdir, nix_conf="")
    daemon.conf_dir.mkdir(parents=True)
    (daemon.conf_dir / "nix.conf").write_text(daemon_config([remote.url], [key]))
    result = configure(daemon.conf_dir, **env)
    assert result.returncode == 0, result.stderr
    return daemon


@pytest.mark.parametrize("remote", [None, 40], indirect=True,
                         ids=["remote-without-priority", "remote-priority-40"])
def test_the_agent_wins_over_remote_caches(scratch: Path, remote: UpstreamServer,
                                           signing_key: tuple[Path, str],
                                           small_closure: Closure) -> None:
    agent = AgentProcess(scratch / "agent", [remote.url], [signing_key[1]])
    daemon = node_daemon(scratch / "node", remote, signing_key[1], FILE_STORE="",
                         SUBSTITUTER=f"{agent.url}?priority=-1")
    with agent, daemon:
        pod = daemon.realise(*small_closure.roots)
        assert pod.returncode == 0, pod.stderr
        # The daemon asked the agent for every path, and fetched nothing from the remote
        # itself: the remote's NARs were requested once each, by the agent.
        assert agent.metric("flox_node_cache_lookups_total", kind="nar") == \
            len(small_closure.paths)
        assert remote.count("/nar/*") == len(small_closure.paths)


@pytest.mark.parametrize("file_store", [True, False], ids=["with-file-store", "agent-only"])
def test_pod_start_with_the_agent_down(scratch: Path, remote: UpstreamServer,
                                       signing_key: tuple[Path, str], small_closure: Closure,
                                       file_store: bool) -> None:
    agent = AgentProcess(scratch / "agent", [remote.url], [signing_key[1]],
                         store=scratch / "agent-store")
    daemon = node_daemon(
        scratch / "node", remote, signing_key[1],
        FILE_STORE=f"file://{agent.store}?priority=-2" if file_store else "",
        SUBSTITUTER=f"{agent.url}?priority=-1")
    with daemon:
        with agent:
            job = admin(agent, "POST", "/v1/prewarm", {"store_paths": small_closure.roots})
            eventually(lambda: admin(agent, "GET", f"/v1/prewarm/{job['id']}")["state"]
                       == "succeeded", "prewarmed")
            # The daemon has used the agent (an earlier pod start), as on a live node.
            earlier = daemon.realise(small_closure.chain[-1])
            assert earlier.returncode == 0, earlier.stderr
        remote.reset_counts()
        pod = daemon.realise(*small_closure.roots)  # the agent is down (e.g. restarting)
    if file_store:
        assert pod.returncode == 0, pod.stderr
        assert remote.count("*.narinfo") == remote.count("/nar/*") == 0
    else:  # Nix 2.8: a daemon that used an HTTP substituter now down fails the start
        assert pod.returncode != 0


def test_an_include_the_host_cannot_read_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "nix.conf").write_text("substituters = https://cache.nixos.org\n")
    result = configure(tmp_path, HOST_NIX_CONF_DIR="/nonexistent/etc/nix")
    assert result.returncode == 1
    assert "ERROR" in result.stderr and "/nonexistent/etc/nix/flox-node-cache.conf" in \
        result.stderr
    assert (tmp_path / "nix.conf").read_text() == "substituters = https://cache.nixos.org\n"


def test_uninstall_removes_the_include_the_dropin_and_the_roots(tmp_path: Path) -> None:
    original = "build-users-group =\nsubstituters = https://cache.nixos.org\n"
    conf = tmp_path / "etc-nix"
    conf.mkdir()
    # An install by an older version wrote an absolute include; both forms go.
    (conf / "nix.conf").write_text(original + f"!include {conf}/flox-node-cache.conf\n")
    assert configure(conf).returncode == 0
    assert (conf / "nix.conf").read_text() == original + "!include flox-node-cache.conf\n"
    roots = tmp_path / "gcroots" / "flox-node-cache"
    (roots / "pod_a-0123").mkdir(parents=True)
    (roots / "pod_a-0123" / ".holder").write_text("{}")
    (roots / "pod_a-0123" / "x-hello").symlink_to("/nix/store/x-hello")
    (roots / "not-ours").mkdir()

    result = configure(conf, "--uninstall", NODE_GCROOTS_DIR=str(roots))
    assert result.returncode == 0, result.stderr
    assert (conf / "nix.conf").read_text() == original
    assert not (conf / "flox-node-cache.conf").exists()
    assert sorted(p.name for p in roots.iterdir()) == ["not-ours"]


def test_uninstall_manifest_runs_the_scripts_copy_in_the_image() -> None:
    ds = yaml.safe_load((NODE_CONFIG / "uninstall.yaml").read_text())
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][-1] == "--uninstall"
    dockerfile = (DAEMONSET / "Dockerfile").read_text()
    script = Path(init["command"][1])
    assert f"configure-nix.sh {script.parent}/" in dockerfile
    env = {e["name"]: e["value"] for e in init["env"]}
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"]["path"] for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[env["NIX_CONF_DIR"]]] == "/etc/nix"
    gcroots = Path(env["NODE_GCROOTS_DIR"])
    assert f"{volumes[mounts[str(gcroots.parent)]]}/{gcroots.name}" == \
        "/nix/var/nix/gcroots/flox-node-cache"


def test_the_overlay_wires_agent_relay_and_roots() -> None:
    from agent.config import load
    from tests.daemonset.test_manifests import pod_spec

    spec = pod_spec("daemonset/overlays/node-config")
    containers = {c["name"]: c for c in spec["containers"]}
    agent, relay = containers["agent"], containers["node-relay"]
    volumes = {v["name"]: v for v in spec["volumes"]}

    def mounts(c: dict) -> dict[str, dict]:
        return {m["mountPath"]: {**m, **volumes[m["name"]]} for m in c["volumeMounts"]}

    env = {e["name"]: e["value"] for e in agent["env"] if "value" in e}
    cfg = load(None, {}, environ=env)  # the agent accepts its environment
    assert cfg.realise_into_node == "pinned"
    # The agent reaches the daemon only through the relay's socket, in a volume they share.
    args = dict(a.removeprefix("--").split("=", 1) for a in relay["args"][1:] if "=" in a)
    assert Path(args["listen"]) == cfg.nix_daemon_socket
    shared = mounts(agent)[str(cfg.nix_daemon_socket.parent)]
    assert shared["name"] == mounts(relay)[str(cfg.nix_daemon_socket.parent)]["name"]
    assert "emptyDir" in shared
    daemon_dir = str(Path(args["nix-daemon-socket"]).parent)
    assert mounts(relay)[daemon_dir]["readOnly"] is True
    assert mounts(relay)[daemon_dir]["hostPath"]["path"] == daemon_dir
    assert all("daemon-socket" not in p for p in mounts(agent))
    # The roots at the same path in the agent's container as on the host.
    roots = mounts(agent)[str(cfg.node_gcroots_dir)]
    assert roots["hostPath"]["path"] == str(cfg.node_gcroots_dir)
    # The relay is never root, never privileged.
    sc = relay["securityContext"]
    assert sc["runAsUser"] != 0 and sc["runAsNonRoot"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["allowPrivilegeEscalation"]
