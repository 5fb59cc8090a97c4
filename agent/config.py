"""One typed configuration, from defaults < TOML file < environment < flags, validated once.

Each setting is declared once, as a field of `Config` whose metadata (help, metavar, choices,
bounds, its user-facing name) generates everything else: the `run` flag `--NAME`, the
environment variable `FLOX_NODE_CACHE_<NAME>` and the TOML key `NAME`, and the defaults shown in
`run --help` are the field defaults themselves.
"""

import difflib
import math
import operator
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, get_args, get_origin

from agent.nix.signing import KeyFormatError, PublicKey, SecretKey

ENV_PREFIX = "FLOX_NODE_CACHE_"
DEFAULT_UPSTREAMS = ("https://cache.nixos.org", "https://cache.flox.dev")
DEFAULT_KEYS = (
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
    "flox-cache-public-1:7F4OyH7ZCnFhcze3fJdfyXYLQw/aV7GEed86nQ7IsOs=",
)
# A Kubernetes qualified name: an optional DNS subdomain prefix, a name of up to 63 characters.
TAINT_KEY = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


class ConfigError(ValueError):
    pass


def in_cluster(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a Kubernetes pod: the service environment Kubernetes gives every pod is set."""
    return bool((os.environ if environ is None else environ).get("KUBERNETES_SERVICE_HOST"))


# --- per-value checks, run as each source is read, so an error names where the value came from

def _size_check(text: str) -> None:
    parse_size(text)


def _budget_check(text: str) -> None:
    parse_budget(text, 1 << 40)


def _url_check(url: str) -> None:
    if not re.fullmatch(r"(https?|file)://\S+", url):
        raise ConfigError(f"{url!r} is not an http(s):// or file:// URL")


def _origin_check(url: str) -> None:
    if not re.fullmatch(r"https?://[^/?#\s]+/?", url):
        raise ConfigError(f"{url!r} is not an origin such as https://cdn.example.org[:PORT]")


def _taint_key_check(key: str) -> None:
    if key and not TAINT_KEY.fullmatch(key):
        raise ConfigError(f"{key!r} is not a taint key (e.g. flox.dev/node-cache-warming)")


def _hostport_check(text: str) -> None:
    parse_hostport(text)


def _peer_check(url: str) -> None:
    if not re.fullmatch(r"https?://[^/\s]+/?", url):
        raise ConfigError(f"peer {url!r} is not an http(s)://HOST:PORT URL")


def setting(default: Any, help: str, *, metavar: str | None = None,
            choices: tuple[str, ...] = (), name: str | None = None,
            at_least: float | None = None, above: float | None = None,
            at_most: float | None = None, check: Callable[[str], None] | None = None,
            default_text: str | None = None) -> Any:
    """A Config field that is a user setting. `name` (default: the field name with `-`) is
    its one user-facing name; `check` validates each (string) value; `default_text` replaces
    the rendered default when the default is computed elsewhere (None)."""
    return field(default=default, metadata={
        "help": help, "metavar": metavar, "choices": choices, "name": name,
        "at_least": at_least, "above": above, "at_most": at_most, "check": check,
        "default_text": default_text})


_PLAIN = setting(None, "").metadata  # what a field declared without setting() gets
_INTERNAL = {"internal": True}


@dataclass(frozen=True)
class Config:
    store: Path = setting(Path("var/store"), "store directory, a valid file:// binary cache",
                          metavar="DIR")
    socket: Path = setting(Path("var/run/agent.sock"),
                           "Unix socket: cache protocol and admin API", metavar="PATH")
    socket_group: str | None = setting(None, "group owning the 0660 socket", metavar="GROUP",
                                       default_text="the agent's group")
    listen: str = setting("127.0.0.1:37515", "loopback cache listener, read-only",
                          metavar="HOST:PORT", check=_hostport_check)
    metrics_listen: str = setting("127.0.0.1:37516", "/metrics, /healthz, /readyz",
                                  metavar="HOST:PORT", check=_hostport_check)
    upstreams: tuple[str, ...] = setting(
        DEFAULT_UPSTREAMS, "upstream binary cache, in priority order; repeatable or "
        "comma-separated", metavar="URL", name="upstream", check=_url_check)
    trusted_public_keys: tuple[str, ...] = setting(
        DEFAULT_KEYS, "key whose signatures upstream narinfos must carry; repeatable or "
        "comma-separated", metavar="NAME:KEY", name="trusted-public-key",
        default_text="the keys of the default upstreams")
    require_signatures: bool = setting(
        True, "refuse upstream narinfos without a trusted signature (NarHash is verified "
        "either way)")
    signing_key_file: Path | None = setting(
        None, "secret key (nix-store --generate-binary-cache-key) to add our own signature",
        metavar="FILE", default_text="none")
    priority: int = setting(10, "Priority in nix-cache-info; lower is preferred", metavar="N",
                            at_least=0)
    store_budget: str = setting("25%", "store size budget, everything the store writes "
                                "counted: a size (50G) or a share of the store's filesystem",
                                metavar="SIZE|PCT", check=_budget_check)
    gc_high_watermark: float = setting(0.95, "start evicting above this share of the budget",
                                       metavar="RATIO", above=0, at_most=1)
    gc_low_watermark: float = setting(0.85, "evict down to this share of the budget",
                                      metavar="RATIO", above=0, at_most=1)
    gc_interval: float = setting(30.0, "seconds between eviction checks", metavar="SECONDS",
                                 above=0)
    direct_read_grace: float = setting(
        300.0, "eviction keeps a file this long after the node's Nix last opened it straight "
        "from the store directory (file:// substituter), or opened its narinfo",
        metavar="SECONDS", at_least=0)
    scrub_interval: float = setting(3600.0, "seconds between background re-hash passes, 0 to "
                                    "disable", metavar="SECONDS", at_least=0)
    scrub_rate: str = setting("20M", "bytes per second the scrub may read", metavar="SIZE",
                              check=_size_check)
    recompress: str = setting("zstd", "re-encode ingested NARs so clients unpack them fast: "
                              "zstd (uncompressed where zstd saves under a tenth), "
                              "uncompressed (fastest, more disk), or none (keep the upstream "
                              "encoding)", choices=("zstd", "uncompressed", "none"))
    recompress_level: int = setting(3, "zstd level", metavar="N", at_least=1, at_most=22)
    recompress_grace: float = setting(3600.0, "how long the original encoding stays servable "
                                      "for clients holding its narinfo", metavar="SECONDS",
                                      at_least=0)
    upstream_connect_timeout: float = setting(5.0, "upstream connection timeout",
                                              metavar="SECONDS", above=0)
    upstream_read_timeout: float = setting(30.0, "longest silence in an upstream response",
                                           metavar="SECONDS", above=0)
    upstream_narinfo_timeout: float = setting(10.0, "whole upstream narinfo request",
                                              metavar="SECONDS", above=0)
    upstream_redirect_origin: tuple[str, ...] = setting(
        (), "another origin an upstream may redirect to (e.g. the object store holding its "
        "NARs); redirects within an upstream's own origin are always followed, others are "
        "errors; repeatable or comma-separated", metavar="URL", check=_origin_check,
        default_text="none")
    circuit_failures: int = setting(3, "consecutive errors that take an upstream out of use",
                                    metavar="N", at_least=1)
    circuit_cooldown: float = setting(30.0, "how long an upstream stays out of use",
                                      metavar="SECONDS", above=0)
    negative_ttl: float = setting(30.0, "how long a path no upstream has is remembered as "
                                  "missing, 0 to not remember", metavar="SECONDS", at_least=0)
    max_connections: int = setting(
        1024, "client connections per cache listener (TCP, and the socket); at the cap the "
        "oldest idle one is closed, or the new one answered 503; lowered to fit the open-file "
        "limit", metavar="N", at_least=1)
    header_timeout: float = setting(10.0, "a client must send its request headers within this "
                                    "time", metavar="SECONDS", above=0)
    keepalive_timeout: float = setting(30.0, "an idle keep-alive connection is closed after "
                                       "this time", metavar="SECONDS", above=0)
    client_stall_timeout: float = setting(60.0, "a NAR transfer whose client reads nothing for "
                                          "this long is dropped", metavar="SECONDS", above=0)
    prefetch_concurrency: int = setting(8, "parallel fetches per prewarm", metavar="N",
                                        at_least=1)
    upstream_downloads: int = setting(
        16, "NAR downloads from the upstreams at once, and as many uncached streams (a full "
        "disk; each holds a decoder of up to 80 MiB, 8 MiB for xz -6); more wait for a turn",
        metavar="N", at_least=1)
    floxhub_git_url: str = setting("https://api.flox.dev/git", "FloxHub git base; remotes are "
                                   "URL/<owner>/floxmeta", metavar="URL", check=_url_check)
    floxhub_token_file: Path | None = setting(
        None, "file holding a FloxHub token for private environments (never logged)",
        metavar="FILE", default_text="none")
    generation_watch_interval: float = setting(
        60.0, "how often environments in use are checked for a new generation",
        metavar="SECONDS", above=0)
    system: str | None = setting(None, "Nix system of this node", metavar="SYSTEM",
                                 default_text="detected, e.g. x86_64-linux")
    kubernetes: str = setting("auto", "watch the Kubernetes API; auto: when in a cluster or "
                              "--kubeconfig is given", choices=("auto", "on", "off"))
    kubeconfig: Path | None = setting(None, "kubeconfig file", metavar="FILE",
                                      default_text="the in-cluster service account")
    node_name: str | None = setting(None, "this node's name", metavar="NAME",
                                    default_text="$NODE_NAME")
    warm_taint: str = setting("", "startup taint (e.g. flox.dev/node-cache-warming) to remove "
                              "from this node once every EnvironmentPrewarm selecting it is "
                              "Ready here", metavar="KEY", check=_taint_key_check,
                              default_text="empty: off")
    warm_taint_timeout: float = setting(600.0, "remove the warm taint after this long even if "
                                        "not warm", metavar="SECONDS", above=0)
    peers: tuple[str, ...] = setting(
        (), "another node's agent (its --peer-listen as http://HOST:PORT); repeatable or "
        "comma-separated", metavar="URL", name="peer", check=_peer_check, default_text="none")
    peer_listen: str | None = setting(None, "listener for other nodes' agents, the address "
                                      "peers reach this node at", metavar="HOST:PORT",
                                      check=_hostport_check, default_text="off")
    peer_token_file: Path | None = setting(
        None, "cluster-shared secret peers authenticate with (required with peers)",
        metavar="FILE", default_text="none")
    peer_service: str | None = setting(
        None, "headless Service whose ready endpoints are the peers (EndpointSlices, watched; "
        "needs the Kubernetes API)", metavar="NAME", default_text="none")
    peer_namespace: str | None = setting(None, "namespace of --peer-service", metavar="NS",
                                         default_text="$POD_NAMESPACE, else the service "
                                         "account's")
    peer_timeout: float = setting(1.0, "connect timeout to a peer; a failing peer is skipped "
                                  "for --circuit-cooldown", metavar="SECONDS", above=0)
    realise_into_node: str = setting(
        "off", "pinned: make pinned closures valid in the node's own Nix store through its "
        "nix-daemon, GC-rooted while pinned", choices=("off", "pinned"))
    nix_daemon_socket: Path = setting(
        Path("/nix/var/nix/daemon-socket/socket"), "the node's nix-daemon socket, reached as an "
        "untrusted (non-root) client: as root, the node-relay's socket", metavar="PATH")
    node_gcroots_dir: Path = setting(
        Path("/nix/var/nix/gcroots/flox-node-cache"), "where the agent's GC roots in the node's "
        "store live, at the same path on the host", metavar="DIR")
    node_realise_budget: str = setting(
        "10%", "most NarSize rooted in the node's store: a size (20G) or a share of the "
        "filesystem holding --node-gcroots-dir; the oldest pins lose their roots first",
        metavar="SIZE|PCT", check=_budget_check)
    log_format: str = setting("text", "log format", choices=("text", "json"))
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))

    # Parsed forms, filled by validate(); notices (deprecated names used) are filled by load().
    public_keys: tuple[PublicKey, ...] = field(default=(), compare=False, repr=False,
                                               metadata=_INTERNAL)
    signing_key: SecretKey | None = field(default=None, compare=False, repr=False,
                                          metadata=_INTERNAL)
    notices: tuple[str, ...] = field(default=(), compare=False, repr=False, metadata=_INTERNAL)

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_hostport(self.listen)

    @property
    def metrics_addr(self) -> tuple[str, int]:
        return parse_hostport(self.metrics_listen)

    @property
    def peer_addr(self) -> tuple[str, int] | None:
        return parse_hostport(self.peer_listen) if self.peer_listen else None

    @property
    def peers_enabled(self) -> bool:
        """Whether this agent asks peers (static ones, or discovered through its Service)."""
        return bool(self.peers or self.peer_service)

    def budget_bytes(self, filesystem_bytes: int) -> int:
        return parse_budget(self.store_budget, filesystem_bytes)

    def kubernetes_enabled(self, environ: Mapping[str, str] | None = None) -> bool:
        """on: always; off: never; auto: inside a cluster or with --kubeconfig."""
        if self.kubernetes == "auto":
            return bool(self.kubeconfig) or in_cluster(environ)
        return self.kubernetes == "on"

    def validate(self) -> "Config":
        """Checks across settings, and parse the keys (each value was checked as it was read)."""
        if not self.upstreams:
            raise ConfigError("at least one --upstream is required")
        if not self.gc_low_watermark < self.gc_high_watermark:
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
        if self.require_signatures and not keys:
            raise ConfigError("signatures are required but no --trusted-public-key is set")
        self._validate_peers()
        return replace(self, public_keys=keys, signing_key=secret)

    def _validate_peers(self) -> None:
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


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


# Binary units, as everywhere in the project: 1K = 1 KiB = 1024 bytes. A bare number is bytes.
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"{text!r} is not a size such as 512M or 50G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_budget(text: str, filesystem_bytes: int) -> int:
    """A size (`50G`) or a share of the store's filesystem (`25%`)."""
    if text.strip().endswith("%"):
        try:
            share = float(text.strip()[:-1])
        except ValueError:
            raise ConfigError(f"{text!r} is not a percentage") from None
        if not 0 < share <= 100:
            raise ConfigError(f"{text!r} must be a share between 0% and 100%")
        return int(filesystem_bytes * share / 100)
    return parse_size(text)


# --- the settings, derived from the fields ---------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One user setting: a Config field seen through its metadata."""

    field: str
    name: str
    kind: type          # str, int, float, bool, Path, or tuple (of strings)
    optional: bool
    default: Any
    meta: Mapping[str, Any]

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def old_name(self) -> str | None:
        """The field name, when it differs from the setting's name: accepted, deprecated."""
        old = self.field.replace("_", "-")
        return old if old != self.name else None

    def default_text(self) -> str:
        if self.meta["default_text"]:
            return self.meta["default_text"]
        if self.kind is tuple:
            return ", ".join(self.default)
        if self.kind is bool:
            return "on" if self.default else "off"
        if self.kind is float:
            return f"{self.default:g}"
        return str(self.default)

    def coerce(self, raw: Any, where: str, typed: bool) -> Any:
        """`raw` from one source as this setting's value. `typed`: the source (TOML) has its
        own types, which must match; otherwise raw is text (or a list of texts from flags)."""
        if self.optional and raw == "":  # FLOX_NODE_CACHE_NODE_NAME= unsets
            return None
        if self.kind is tuple:
            items = raw if isinstance(raw, list | tuple) else [raw]
            if not all(isinstance(i, str) for i in items):
                raise ConfigError(f"{where}: {raw!r} is not a list of strings")
            values = tuple(v.strip() for i in items for v in i.split(",") if v.strip())
            for v in values:
                self._check(v, where)
            return values
        value = _convert(self.kind, raw, where, typed)
        self._check(value, where)
        return value

    def _check(self, value: Any, where: str) -> None:
        m = self.meta
        if m["choices"] and value not in m["choices"]:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(m['choices'])}")
        for bound, ok, words in _BOUNDS:
            if m[bound] is not None and not ok(value, m[bound]):
                raise ConfigError(f"{where}: must be {words} {m[bound]:g}, not {value!r}")
        if m["check"]:
            try:
                m["check"](value)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None


_BOUNDS = (("at_least", operator.ge, "at least"), ("above", operator.gt, "more than"),
           ("at_most", operator.le, "at most"))
_TEXT_KINDS = {int: "a whole number", float: "a number", bool: "true or false"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(kind: type, raw: Any, where: str, typed: bool) -> Any:
    if typed:  # TOML: the value's own type must fit
        fits = {bool: isinstance(raw, bool), int: type(raw) is int,
                float: type(raw) in (int, float)}.get(kind, isinstance(raw, str))
        if not fits:
            hint = (": write a size with its unit as a string, e.g. \"50G\""
                    if kind is str and isinstance(raw, int | float) else "")
            return _type_error(kind, raw, where, hint)
        return Path(raw) if kind is Path else kind(raw)
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        return _type_error(kind, raw, where)
    return Path(text) if kind is Path else text


def _type_error(kind: type, raw: Any, where: str, hint: str = "") -> Any:
    raise ConfigError(f"{where}: {raw!r} is not {_TEXT_KINDS.get(kind, 'a string')}{hint}")


def _setting(f: Field) -> Setting:
    typ, optional = f.type, False
    if isinstance(typ, UnionType):
        optional = NoneType in get_args(typ)
        typ = next(a for a in get_args(typ) if a is not NoneType)
    kind = tuple if get_origin(typ) is tuple else typ
    meta = {**_PLAIN, **f.metadata}
    return Setting(f.name, meta["name"] or f.name.replace("_", "-"), kind, optional, f.default,
                   meta)


# Every field but the parsed forms is a setting (one declared without setting() gets a flag
# with no help: give it one).
SETTINGS: tuple[Setting, ...] = tuple(_setting(f) for f in fields(Config)
                                      if not f.metadata.get("internal"))
_BY_FIELD = {s.field: s for s in SETTINGS}


def setting_of(field_name: str) -> Setting:
    return _BY_FIELD[field_name]


def _lookup(key: str) -> tuple[Setting, bool] | None:
    """The setting a TOML key or environment suffix names, and whether the name is deprecated."""
    key = key.lower().replace("_", "-")
    for s in SETTINGS:
        if key == s.name:
            return s, False
        if key == s.old_name:
            return s, True
    return None


# --- sources ---------------------------------------------------------------------------------

def _unknown(key: str, where: str) -> str:
    name = key.lower().replace("_", "-")
    close = difflib.get_close_matches(name, [s.name for s in SETTINGS], n=1)
    return f"{where}: unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _from_file(path: Path) -> Iterator[tuple[str, Any, str]]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    for key, raw in data.items():
        yield key, raw, f"{path}: {key}"


def _from_environ(environ: Mapping[str, str]) -> Iterator[tuple[str, Any, str]]:
    for var, raw in environ.items():
        if var.startswith(ENV_PREFIX) and var != ENV_PREFIX + "CONFIG":
            yield var[len(ENV_PREFIX):], raw, var
    if environ.get("NODE_NAME") and _BY_FIELD["node_name"].env not in environ:
        yield "node-name", environ["NODE_NAME"], "NODE_NAME"


def _apply(cfg: Config, entries: Iterator[tuple[str, Any, str]], source: str,
           typed: bool = False) -> Config:
    changes, notices = {}, list(cfg.notices)
    for key, raw, where in entries:
        found = _lookup(key)
        if found is None:
            raise ConfigError(_unknown(key, where if source == "environment" else source))
        s, deprecated = found
        if deprecated:
            notices.append(f"{where} is deprecated, use "
                           f"{s.env if source == 'environment' else s.name}")
        changes[s.field] = s.coerce(raw, where, typed)
    return replace(cfg, **changes, notices=tuple(notices))


def from_flags(cfg: Config, flags: Mapping[str, Any]) -> Config:
    """Flags keyed by field name (argparse's dest), as text or lists of text."""
    changes = {}
    for name, raw in flags.items():
        if raw is None:
            continue
        s = _BY_FIELD.get(name)
        if s is None:
            raise ConfigError(f"unknown setting {name!r}")
        changes[name] = s.coerce(raw, s.flag, typed=False)
    return replace(cfg, **changes)


def load(config_file: Path | None, flags: Mapping[str, Any],
         environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration: defaults, then the file, then FLOX_NODE_CACHE_*, then flags."""
    environ = os.environ if environ is None else environ
    cfg = Config()
    config_file = config_file or (Path(environ[ENV_PREFIX + "CONFIG"])
                                  if environ.get(ENV_PREFIX + "CONFIG") else None)
    if config_file:
        cfg = _apply(cfg, _from_file(config_file), str(config_file), typed=True)
    cfg = _apply(cfg, _from_environ(environ), "environment")
    cfg = from_flags(cfg, flags)
    if cfg.kubernetes == "auto" and cfg.kubernetes_enabled(environ) and not cfg.node_name:
        raise ConfigError("running against a cluster but the node name is unknown: set NODE_NAME "
                          "(downward API) or --node-name, or --kubernetes off")
    return cfg.validate()
