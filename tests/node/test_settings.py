"""The realisation settings, and the relay's refusal to run as root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load


def test_defaults_and_sources(tmp_path: Path) -> None:
    cfg = load(None, {}, environ={})
    assert (cfg.realise_into_node, cfg.node_realise_budget) == ("off", "10%")
    assert cfg.nix_daemon_socket == Path("/nix/var/nix/daemon-socket/socket")
    toml = tmp_path / "c.toml"
    toml.write_text('realise-into-node = "pinned"\nnode-gcroots-dir = "/r"\n')
    cfg = load(toml, {"node_realise_budget": "20G"},
               environ={"FLOX_NODE_CACHE_NIX_DAEMON_SOCKET": "/relay/socket"})
    assert cfg.realise_into_node == "pinned" and cfg.node_gcroots_dir == Path("/r")
    assert cfg.nix_daemon_socket == Path("/relay/socket")
    assert cfg.node_realise_budget == "20G"


@pytest.mark.parametrize("change", [{"realise_into_node": "always"},
                                    {"node_realise_budget": "lots"}])
def test_bad_values_are_configuration_errors(change: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load(None, change, {})


def test_cli_flags() -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "run", "--realise-into-node", "always"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "realise-into-node" in r.stderr


def test_the_relay_refuses_to_run_as_root(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "node-relay", "--listen",
                        str(tmp_path / "s")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "refusing to run as root" in r.stderr
    assert not (tmp_path / "s").exists()
