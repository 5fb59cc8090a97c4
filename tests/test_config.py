"""One typed configuration: defaults < TOML file < environment < flags, validated once; each
setting declared once, as a Config field whose metadata makes its flag, variable and key."""

from dataclasses import fields
from pathlib import Path

import pytest

from agent.cli import parser
from agent.config import (
    DEFAULT_UPSTREAMS,
    SETTINGS,
    Config,
    ConfigError,
    in_cluster,
    load,
    parse_budget,
    parse_size,
)

INTERNAL = {"public_keys", "signing_key", "notices"}


def run_parser():  # type: ignore[no-untyped-def]
    return parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]


def flags(*argv: str) -> dict:
    """The flags a `run` command line gives load(), through the real parser."""
    args = run_parser().parse_args(list(argv))
    return {s.field: getattr(args, s.field) for s in SETTINGS}


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('store = "/from/file"\nstore-budget = "10G"\npriority = 20\n'
                 'upstream = ["http://a", "http://b"]\n')
    env = {"FLOX_NODE_CACHE_STORE_BUDGET": "20G", "FLOX_NODE_CACHE_PRIORITY": "30",
           "NODE_NAME": "node-7"}
    cfg = load(f, flags("--priority", "40"), env)
    assert cfg.store == Path("/from/file")
    assert cfg.store_budget == "20G"
    assert cfg.priority == 40
    assert cfg.upstreams == ("http://a", "http://b")
    assert cfg.node_name == "node-7"
    assert len(cfg.public_keys) == 2


def test_every_field_is_a_setting_with_a_generated_flag_and_help() -> None:
    settable = {f.name for f in fields(Config)} - INTERNAL
    assert settable == {s.field for s in SETTINGS}
    actions = {a.dest: a for a in run_parser()._actions}
    for s in SETTINGS:
        assert s.meta["help"], f"declare {s.field} with setting(default, help, ...)"
        action = actions[s.field]
        assert s.flag in action.option_strings
        # the default shown is the field's own, and the variable name is the flag's
        assert f"default {s.default_text()}".replace("%", "%%") in action.help, s.name
        assert s.env == "FLOX_NODE_CACHE_" + s.flag[2:].upper().replace("-", "_")
        assert action.help.endswith(f"${s.env})")


def test_defaults_in_help_follow_the_field_defaults() -> None:
    help_text = " ".join(run_parser().format_help().split())  # unwrapped
    assert "default 30; $FLOX_NODE_CACHE_NEGATIVE_TTL" in help_text
    assert "default 25%; $FLOX_NODE_CACHE_STORE_BUDGET" in help_text
    assert f"default {', '.join(DEFAULT_UPSTREAMS)}; $FLOX_NODE_CACHE_UPSTREAM" in help_text


@pytest.mark.parametrize("source", ["flag", "flag-commas", "env", "toml"])
def test_a_list_setting_has_one_name_everywhere(tmp_path: Path, source: str) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('upstream = ["http://a", "http://b"]\n'
                 'trusted-public-key = ["k:' + "A" * 43 + '="]\n'
                 "require-signatures = false\n")
    argv, env, file = [], {}, None
    if source == "flag":
        argv = ["--upstream", "http://a", "--upstream", "http://b"]
    elif source == "flag-commas":
        argv = ["--upstream", "http://a,http://b"]
    elif source == "env":
        env = {"FLOX_NODE_CACHE_UPSTREAM": "http://a, http://b"}
    else:
        file = f
    cfg = load(file, flags(*argv), env)
    assert cfg.upstreams == ("http://a", "http://b")
    assert cfg.notices == ()


def test_the_old_plural_spellings_still_work_with_a_deprecation_notice(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('upstreams = ["http://a"]\n')
    keys = ",".join(Config().trusted_public_keys)
    cfg = load(f, {}, {"FLOX_NODE_CACHE_TRUSTED_PUBLIC_KEYS": keys})
    assert cfg.upstreams == ("http://a",)
    assert cfg.notices == (f"{f}: upstreams is deprecated, use upstream",
                           "FLOX_NODE_CACHE_TRUSTED_PUBLIC_KEYS is deprecated, use "
                           "FLOX_NODE_CACHE_TRUSTED_PUBLIC_KEY")


@pytest.mark.parametrize("argv,message", [
    (["--listen", "nowhere"], "--listen: 'nowhere' is not HOST:PORT"),
    (["--upstream", "ftp://x"], "--upstream: 'ftp://x' is not an http"),
    (["--trusted-public-key", "nocolon"], "NAME:BASE64"),
    (["--trusted-public-key", "k:AAAA"], "32 bytes"),
    (["--store-budget", "lots"], "--store-budget: 'lots' is not a size"),
    (["--store-budget", "150%"], "between"),
    (["--gc-low-watermark", "0.99"], "watermarks"),
    (["--gc-high-watermark", "1.5"], "--gc-high-watermark: must be at most 1, not 1.5"),
    (["--recompress-level", "99"], "--recompress-level: must be at most 22, not 99"),
    (["--recompress", "gzip"], "--recompress: 'gzip' is not one of zstd, uncompressed, none"),
    (["--kubernetes", "on"], "node name"),
    (["--signing-key-file", "/nonexistent/key"], "signing key file"),
    (["--negative-ttl", "abc"], "--negative-ttl: 'abc' is not a number"),
    (["--negative-ttl", "nan"], "--negative-ttl: 'nan' is not a number"),
    (["--negative-ttl", "-1"], "--negative-ttl: must be at least 0, not -1.0"),
    (["--priority", "1.5"], "--priority: '1.5' is not a whole number"),
    (["--circuit-failures", "-1"], "--circuit-failures: must be at least 1, not -1"),
    (["--prefetch-concurrency", "0"], "--prefetch-concurrency: must be at least 1, not 0"),
    (["--gc-interval", "0"], "--gc-interval: must be more than 0, not 0.0"),
    (["--max-connections", "0"], "--max-connections: must be at least 1, not 0"),
    (["--header-timeout", "0"], "--header-timeout: must be more than 0, not 0.0"),
    (["--client-stall-timeout", "-1"], "--client-stall-timeout: must be more than 0, not -1.0"),
])
def test_invalid_settings_are_rejected_with_a_clear_message(argv: list[str], message: str) \
        -> None:
    with pytest.raises(ConfigError) as e:
        load(None, flags(*argv), {})
    assert message in str(e.value)


def test_unknown_file_keys_and_bad_values_name_their_source(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("stroe = 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'stroe' \(did you mean 'store'\?\)"):
        load(f, {}, {})
    with pytest.raises(ConfigError, match="FLOX_NODE_CACHE_UPSTREEM: unknown setting 'UPSTREEM' "
                                          r"\(did you mean 'upstream'\?\)"):
        load(None, {}, {"FLOX_NODE_CACHE_UPSTREEM": "http://a"})
    with pytest.raises(ConfigError, match="FLOX_NODE_CACHE_PRIORITY: 'high' is not a whole"):
        load(None, {}, {"FLOX_NODE_CACHE_PRIORITY": "high"})
    with pytest.raises(ConfigError, match="FLOX_NODE_CACHE_PREFETCH_CONCURRENCY: must be at"):
        load(None, {}, {"FLOX_NODE_CACHE_PREFETCH_CONCURRENCY": "0"})
    f.write_text("store = [\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load(f, {}, {})


@pytest.mark.parametrize("line,message", [
    ("store-budget = 50", 'bad.toml: store-budget: 50 is not a string: write a size with its '
                          'unit as a string, e.g. "50G"'),
    ("scrub-rate = 20.5", "write a size with its unit"),
    ('priority = "20"', "bad.toml: priority: '20' is not a whole number"),
    ("priority = true", "priority: True is not a whole number"),
    ('require-signatures = "no"', "require-signatures: 'no' is not true or false"),
    ("upstream = [1]", "upstream: [1] is not a list of strings"),
    ("circuit-failures = 0", "bad.toml: circuit-failures: must be at least 1, not 0"),
])
def test_toml_values_must_have_the_right_type(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(line + "\n")
    with pytest.raises(ConfigError) as e:
        load(f, {}, {})
    assert message in str(e.value)


def test_a_size_string_in_toml_means_what_the_readme_says(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('store-budget = "50G"\nscrub-rate = "1048576"\ngc-interval = 5\n')
    cfg = load(f, {}, {})
    assert cfg.budget_bytes(1 << 50) == 50 << 30
    assert parse_size(cfg.scrub_rate) == 1 << 20  # a bare number is bytes
    assert cfg.gc_interval == 5.0  # a TOML integer is a fine number of seconds


def test_sizes_and_budgets() -> None:
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5G") == int(1.5 * (1 << 30))
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("100") == 100
    assert parse_budget("25%", 1000) == 250
    assert parse_budget("1K", 10) == 1024


def test_a_cluster_without_a_node_name_is_refused() -> None:
    assert in_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert not in_cluster({})
    with pytest.raises(ConfigError, match="NODE_NAME"):
        load(None, {}, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    cfg = load(None, {}, {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "NODE_NAME": "n1"})
    assert cfg.node_name == "n1"
    assert cfg.kubernetes_enabled({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert not cfg.kubernetes_enabled({})
    off = load(None, flags("--kubernetes", "off"), {"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert not off.kubernetes_enabled({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})


def test_an_empty_value_unsets_an_optional_setting(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('socket-group = "nix"\n')
    assert load(f, {}, {}).socket_group == "nix"
    assert load(f, {}, {"FLOX_NODE_CACHE_SOCKET_GROUP": ""}).socket_group is None
