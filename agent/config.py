"""One typed configuration, from defaults < TOML file < environment < flags, validated once."""

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from agent.nix.signing import KeyFormatError, PublicKey, SecretKey

ENV_PREFIX = "FLOX_NODE_CACHE_"
DEFAULT_LISTEN = "127.0.0.1:37515"
DEFAULT_METRICS_LISTEN = "127.0.0.1:37516"
DEFAULT_UPSTREAMS = ("https://cache.nixos.org", "https://cache.flox.dev")
DEFAULT_KEYS = (
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
    "flox-cache-public-1:7F4OyH7ZCnFhcze3fJdfyXYLQw/aV7GEed86nQ7IsOs=",
)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    store: Path = Path("var/store")
    socket: Path = Path("var/run/agent.sock")
    socket_group: str | None = None
    listen: str = DEFAULT_LISTEN
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    upstreams: tuple[str, ...] = DEFAULT_UPSTREAMS
    trusted_public_keys: tuple[str, ...] = DEFAULT_KEYS
    require_signatures: bool = True
    signing_key_file: Path | None = None
    priority: int = 10
    store_budget: str = "80%"
    gc_high_watermark: float = 0.95
    gc_low_watermark: float = 0.85
    gc_interval: float = 30.0
    scrub_interval: float = 3600.0
    scrub_rate: str = "20M"
    recompress: str = "zstd"
    recompress_level: int = 3
    recompress_grace: float = 3600.0
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 30.0
    upstream_narinfo_timeout: float = 10.0
    circuit_failures: int = 3
    circuit_cooldown: float = 30.0
    negative_ttl: float = 30.0
    prefetch_concurrency: int = 8
    floxhub_git_url: str = "https://api.flox.dev/git"
    floxhub_token_file: Path | None = None
    generation_watch_interval: float = 60.0
    system: str | None = None
    kubernetes: str = "auto"
    kubeconfig: Path | None = None
    node_name: str | None = None
    peers: tuple[str, ...] = ()
    peer_listen: str | None = None
    peer_token_file: Path | None = None
    peer_service: str | None = None
    peer_namespace: str | None = None
    peer_timeout: float = 1.0
    log_format: str = "text"
    log_level: str = "info"

    # Parsed forms, filled by validate().
    public_keys: tuple[PublicKey, ...] = field(default=(), compare=False, repr=False)
    signing_key: SecretKey | None = field(default=None, compare=False, repr=False)

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_hostport(self.listen, "listen")

    @property
    def metrics_addr(self) -> tuple[str, int]:
        return parse_hostport(self.metrics_listen, "metrics-listen")

    @property
    def peer_addr(self) -> tuple[str, int] | None:
        return parse_hostport(self.peer_listen, "peer-listen") if self.peer_listen else None

    @property
    def peers_enabled(self) -> bool:
        """Whether this agent asks peers (static ones, or discovered through its Service)."""
        return bool(self.peers or self.peer_service)

    def budget_bytes(self, filesystem_bytes: int) -> int:
        return parse_budget(self.store_budget, filesystem_bytes)

    def validate(self) -> "Config":
        self.listen_addr  # noqa: B018 - raises on a bad address
        self.metrics_addr  # noqa: B018
        parse_budget(self.store_budget, 1 << 40)
        parse_size(self.scrub_rate)
        if not self.upstreams:
            raise ConfigError("at least one --upstream is required")
        for url in self.upstreams:
            if not re.fullmatch(r"(https?|file)://\S+", url):
                raise ConfigError(f"upstream {url!r} is not an http(s):// or file:// URL")
        _choice("recompress", self.recompress, ("zstd", "uncompressed", "none"))
        if not 1 <= self.recompress_level <= 22:
            raise ConfigError("recompress-level must be a zstd level from 1 to 22")
        _choice("log-format", self.log_format, ("text", "json"))
        _choice("log-level", self.log_level, ("debug", "info", "warning", "error"))
        _choice("kubernetes", self.kubernetes, ("auto", "on", "off"))
        if not 0 < self.gc_low_watermark < self.gc_high_watermark <= 1:
            raise ConfigError("watermarks must satisfy 0 < low < high <= 1")
        try:
            keys = tuple(PublicKey.parse(k) for k in self.trusted_public_keys)
            secret = (SecretKey.parse(self.signing_key_file.read_text())
                      if self.signing_key_file else None)
        except KeyFormatError as e:
            raise ConfigError(str(e)) from None
        except OSError as e:
            raise ConfigError(f"signing key file: {e.strerror}: {self.signing_key_file}") from None
        if self.kubernetes == "on" and not self.node_name:
            raise ConfigError("Kubernetes is on but the node name is unknown: set NODE_NAME "
                              "(downward API) or --node-name")
        self._validate_peers()
        if self.require_signatures and not keys:
            raise ConfigError("signatures are required but no --trusted-public-key is set")
        return replace(self, public_keys=keys, signing_key=secret)


    def _validate_peers(self) -> None:
        self.peer_addr  # noqa: B018 - raises on a bad address
        for url in self.peers:
            if not re.fullmatch(r"https?://[^/\s]+/?", url):
                raise ConfigError(f"peer {url!r} is not an http(s)://HOST:PORT URL")
        if self.peer_timeout <= 0:
            raise ConfigError("peer-timeout must be positive")
        if not (self.peers_enabled or self.peer_listen):
            return
        if self.peer_token_file is None:
            raise ConfigError("peers need the cluster-shared secret: set --peer-token-file")
        if self.peers_enabled and not self.require_signatures:
            # Without signatures, a peer could make up a narinfo and matching bytes.
            raise ConfigError("peers are trusted for nothing but availability: they need "
                              "signature checks (drop --no-require-signatures)")
        from agent.peers.protocol import PeerToken, PeerTokenError

        try:
            PeerToken(self.peer_token_file).value()
        except PeerTokenError as e:
            raise ConfigError(str(e)) from None
        if self.peer_service and self.kubernetes == "off":
            raise ConfigError("peer-service discovers peers through the Kubernetes API, "
                              "which --kubernetes off turns off")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what} {text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"{text!r} is not a size such as 512M or 50G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_budget(text: str, filesystem_bytes: int) -> int:
    """A size (`50G`) or a share of the store's filesystem (`80%`)."""
    if text.strip().endswith("%"):
        try:
            share = float(text.strip()[:-1])
        except ValueError:
            raise ConfigError(f"store budget {text!r} is not a percentage") from None
        if not 0 < share <= 100:
            raise ConfigError(f"store budget {text!r} must be between 0% and 100%")
        return int(filesystem_bytes * share / 100)
    return parse_size(text)


# --- sources ---------------------------------------------------------------------------------

def _coerce(name: str, raw: Any, typ: Any) -> Any:
    text = str(typ)
    try:
        if "tuple" in text:
            items = raw if isinstance(raw, list | tuple) else [s for s in str(raw).split(",") if s]
            return tuple(str(i).strip() for i in items)
        if raw is None:
            return None
        if typ is bool or text == "bool":
            if isinstance(raw, bool):
                return raw
            return {"1": True, "true": True, "yes": True, "0": False, "false": False,
                    "no": False}[str(raw).lower()]
        if "Path" in text:
            return Path(str(raw))
        if text in ("int", "<class 'int'>"):
            return int(raw)
        if text in ("float", "<class 'float'>"):
            return float(raw)
        return str(raw)
    except (KeyError, ValueError):
        raise ConfigError(f"{name}: {raw!r} is not a valid {text}") from None


def _settable() -> dict[str, Any]:
    return {f.name: f.type for f in fields(Config) if f.name not in ("public_keys", "signing_key")}


def from_mapping(mapping: dict[str, Any], source: str, base: Config) -> Config:
    types = _settable()
    changes = {}
    for key, raw in mapping.items():
        name = key.replace("-", "_")
        if name not in types:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        changes[name] = _coerce(f"{source}: {key}", raw, types[name])
    return replace(base, **changes)


def load(config_file: Path | None, flags: dict[str, Any],
         environ: dict[str, str] | None = None) -> Config:
    """Build the configuration: defaults, then the file, then FLOX_NODE_CACHE_*, then flags."""
    environ = os.environ if environ is None else environ
    cfg = Config()
    config_file = config_file or (Path(environ[ENV_PREFIX + "CONFIG"])
                                  if environ.get(ENV_PREFIX + "CONFIG") else None)
    if config_file:
        try:
            cfg = from_mapping(tomllib.loads(config_file.read_text()), str(config_file), cfg)
        except OSError as e:
            raise ConfigError(f"config file {config_file}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {config_file}: {e}") from None
    env = {k[len(ENV_PREFIX):].lower(): v for k, v in environ.items()
           if k.startswith(ENV_PREFIX) and k != ENV_PREFIX + "CONFIG"}
    if "node_name" not in env and environ.get("NODE_NAME"):
        env["node_name"] = environ["NODE_NAME"]
    cfg = from_mapping(env, "environment", cfg)
    cfg = from_mapping({k: v for k, v in flags.items() if v is not None}, "flags", cfg)
    in_cluster = bool(environ.get("KUBERNETES_SERVICE_HOST"))
    if cfg.kubernetes == "auto" and (in_cluster or cfg.kubeconfig) and not cfg.node_name:
        raise ConfigError("running against a cluster but the node name is unknown: set NODE_NAME "
                          "(downward API) or --node-name, or --kubernetes off")
    return cfg.validate()
