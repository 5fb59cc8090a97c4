"""One typed configuration: defaults < TOML file < environment < flags, validated once."""

from dataclasses import fields
from pathlib import Path

import pytest

from agent.cli import parser
from agent.config import Config, ConfigError, load, parse_budget, parse_size


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('store = "/from/file"\nstore-budget = "10G"\npriority = 20\n'
                 'upstreams = ["http://a", "http://b"]\n')
    env = {"FLOX_NODE_CACHE_STORE_BUDGET": "20G", "FLOX_NODE_CACHE_PRIORITY": "30",
           "NODE_NAME": "node-7"}
    cfg = load(f, {"priority": 40}, env)
    assert cfg.store == Path("/from/file")
    assert cfg.store_budget == "20G"
    assert cfg.priority == 40
    assert cfg.upstreams == ("http://a", "http://b")
    assert cfg.node_name == "node-7"
    assert len(cfg.public_keys) == 2


def test_every_setting_has_a_flag() -> None:
    run = parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    dests = {a.dest for a in run._actions}
    settable = {f.name for f in fields(Config)} - {"public_keys", "signing_key"}
    assert settable <= dests, settable - dests


@pytest.mark.parametrize("flags,message", [
    ({"listen": "nowhere"}, "HOST:PORT"),
    ({"upstreams": ["ftp://x"]}, "http"),
    ({"trusted_public_keys": ["nocolon"]}, "NAME:BASE64"),
    ({"trusted_public_keys": ["k:AAAA"]}, "32 bytes"),
    ({"store_budget": "lots"}, "size"),
    ({"store_budget": "150%"}, "between"),
    ({"gc_low_watermark": 0.99}, "watermarks"),
    ({"recompress_level": 99}, "zstd level"),
    ({"kubernetes": "on"}, "node name"),
    ({"signing_key_file": "/nonexistent/key"}, "signing key file"),
    ({"max_connections": 0}, "max-connections"),
    ({"header_timeout": 0}, "header-timeout"),
    ({"client_stall_timeout": -1}, "client-stall-timeout"),
])
def test_invalid_settings_are_rejected_with_a_clear_message(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(None, flags, {})


def test_unknown_file_keys_and_bad_values_name_their_source(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("stroe = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'stroe'"):
        load(f, {}, {})
    with pytest.raises(ConfigError, match="environment: priority"):
        load(None, {}, {"FLOX_NODE_CACHE_PRIORITY": "high"})
    f.write_text("store = [\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load(f, {}, {})


def test_sizes_and_budgets() -> None:
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5G") == int(1.5 * (1 << 30))
    assert parse_size("100") == 100
    assert parse_budget("25%", 1000) == 250
    assert parse_budget("1K", 10) == 1024


def test_a_cluster_without_a_node_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="NODE_NAME"):
        load(None, {}, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    cfg = load(None, {}, {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "NODE_NAME": "n1"})
    assert cfg.node_name == "n1"
