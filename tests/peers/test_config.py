"""Peer settings: flags, environment and TOML like every other setting; clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load


@pytest.fixture
def token(tmp_path: Path) -> Path:
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    return f


def test_peers_from_environment_and_toml(tmp_path: Path, token: Path) -> None:
    cfg = load(None, {}, {"FLOX_NODE_CACHE_PEER": "http://10.0.0.2:37517,http://10.0.0.3:37517",
                          "FLOX_NODE_CACHE_PEER_TOKEN_FILE": str(token),
                          "FLOX_NODE_CACHE_PEER_LISTEN": "10.0.0.1:37517"})
    assert cfg.peers == ("http://10.0.0.2:37517", "http://10.0.0.3:37517")
    assert cfg.peer_addr == ("10.0.0.1", 37517)
    toml = tmp_path / "agent.toml"
    toml.write_text(f'peer = ["http://10.0.0.9:1"]\npeer-token-file = "{token}"\n'
                    'peer-timeout = 0.5\n')
    cfg = load(toml, {}, {})
    assert (cfg.peers, cfg.peer_timeout, cfg.peers_enabled) == (("http://10.0.0.9:1",), 0.5, True)
    assert not load(None, {}, {}).peers_enabled


@pytest.mark.parametrize(("settings", "message"), [
    ({"peers": ("http://10.0.0.2:1",)}, "--peer-token-file"),
    ({"peer_listen": "10.0.0.1:37517"}, "--peer-token-file"),
    ({"peers": ("ftp://x",), "peer_token_file": "TOKEN"}, "is not an http"),
    ({"peer_listen": "nowhere", "peer_token_file": "TOKEN"}, "HOST:PORT"),
    ({"peers": ("http://a:1",), "peer_token_file": "MISSING"}, "No such file"),
    ({"peers": ("http://a:1",), "peer_token_file": "EMPTY"}, "is empty"),
    ({"peer_service": "svc", "peer_token_file": "TOKEN", "kubernetes": "off"}, "Kubernetes"),
    ({"peers": ("http://a:1",), "peer_token_file": "TOKEN", "require_signatures": False},
     "signature"),
])
def test_bad_peer_settings_are_clear_errors(settings: dict, message: str, token: Path,
                                            tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    paths = {"TOKEN": str(token), "MISSING": str(tmp_path / "nope"), "EMPTY": str(empty)}
    flags = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(ConfigError, match=message):
        load(None, flags, {})


def test_agent_without_the_token_exits_2_with_the_reason(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "run", "--store", str(tmp_path / "s"),
                        "--kubernetes", "off", "--peer", "http://10.0.0.2:37517"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--peer-token-file" in r.stderr and "Traceback" not in r.stderr
