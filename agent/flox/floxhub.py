"""Resolve `owner/env[:N]` to a locked environment the way Flox does, over FloxHub's git.

Each owner's environments live in the git repository `<git base>/<owner>/floxmeta`, one branch
per environment. A branch holds `metadata.json` (the live generation is `current_generation` of
the last `history` entry) and a folder per generation with `N/env/manifest.lock`.

We keep one local bare clone per owner and fetch only the branch we need. The FloxHub token is
read from its file on every use (the mounted Secret rotates) and handed to git through
environment variables, never on the command line nor in the clone's config.
"""

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from agent import metrics
from agent.flox.lockfile import Lockfile, LockfileError, parse_lockfile

log = logging.getLogger(__name__)

DEFAULT_GIT_URL = "https://api.flox.dev/git"
METADATA_FILE = "metadata.json"
# Owners and environment names become URL parts, branch names and directories: keep them tame.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_GENERATION_RE = re.compile(r"[0-9]{1,9}")


# --- references ------------------------------------------------------------------------------

class RefError(ValueError):
    pass


@dataclass(frozen=True)
class EnvRef:
    owner: str
    name: str
    generation: int | None = None

    def __post_init__(self) -> None:
        _check_name("owner", self.owner)
        _check_name("environment name", self.name)
        if self.generation is not None and self.generation < 1:
            raise RefError(f"generation must be a positive number, not {self.generation}")

    @classmethod
    def parse(cls, text: str) -> "EnvRef":
        """Parse `owner/env` (the live generation) or `owner/env:N` (generation N pinned)."""
        text = text.strip()
        owner, slash, rest = text.partition("/")
        if not slash:
            raise RefError(f"invalid environment reference {text!r}: "
                           "expected 'owner/env' or 'owner/env:N'")
        name, colon, generation = rest.partition(":")
        if "/" in name:
            raise RefError(f"invalid environment reference {text!r}: "
                           "an environment name cannot contain '/'")
        try:
            if not colon:
                return cls(owner, name)
            if not _GENERATION_RE.fullmatch(generation):
                raise RefError(f"generation {generation!r} is not a decimal number")
            return cls(owner, name, int(generation))
        except RefError as e:
            raise RefError(f"invalid environment reference {text!r}: {e}") from None

    @property
    def unpinned(self) -> "EnvRef":
        return EnvRef(self.owner, self.name)

    def __str__(self) -> str:
        base = f"{self.owner}/{self.name}"
        return base if self.generation is None else f"{base}:{self.generation}"


def _check_name(kind: str, value: str) -> None:
    if not value:
        raise RefError(f"{kind} is empty")
    if ".." in value:
        raise RefError(f"{kind} {value!r} contains '..'")
    if not _NAME_RE.fullmatch(value):
        raise RefError(f"{kind} {value!r} must start with a letter or digit and contain only "
                       "letters, digits, '.', '_' and '-' (at most 100)")
    if value.endswith((".", ".lock")):
        raise RefError(f"{kind} {value!r} cannot end with '.' or '.lock'")


@dataclass(frozen=True)
class ResolvedEnv:
    ref: EnvRef
    generation: int
    lockfile: Lockfile
    lockfile_text: str
    commit: str


# --- errors ----------------------------------------------------------------------------------

class FloxHubError(Exception):
    def __init__(self, message: str, *, owner: str | None = None, env: str | None = None,
                 generation: int | None = None) -> None:
        super().__init__(message)
        self.owner, self.env, self.generation = owner, env, generation


class UnknownOwner(FloxHubError):
    pass


class UnknownEnvironment(FloxHubError):
    pass


class UnknownGeneration(FloxHubError):
    pass


class MissingLockfile(FloxHubError):
    pass


class AuthenticationFailed(FloxHubError):
    pass


class FloxHubUnreachable(FloxHubError):
    pass


class BadMetadata(FloxHubError):
    pass


class BadLockfile(FloxHubError):
    pass


class _GitFailed(Exception):
    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        self.stderr = stderr


class _GitTimeout(Exception):
    pass


# --- metadata.json ---------------------------------------------------------------------------

def live_generation_from_metadata(text: bytes | str) -> int | None:
    """The live generation named by a floxmeta `metadata.json`; None before the first one.

    Version 2 keeps a `history`; version 1 (older Flox) had `currentGen`. Raises ValueError.
    """
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    version = doc.get("version")
    if version == 2:
        history = doc.get("history")
        if not isinstance(history, list):
            raise ValueError("'history' is missing or not a list")
        if not history:
            return None
        last = history[-1]
        if not isinstance(last, dict):
            raise ValueError("the last history entry is not an object")
        return _generation_id(last.get("current_generation"), "current_generation")
    if version in (1, None) and "generations" in doc:
        current = doc.get("currentGen")
        return None if current is None else _generation_id(current, "currentGen")
    raise ValueError(f"unsupported metadata version {version!r}")


def _generation_id(value: Any, field: str) -> int:
    # Flox writes generation ids as decimal strings; accept plain integers too.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and _GENERATION_RE.fullmatch(value) and int(value) > 0:
        return int(value)
    raise ValueError(f"{field} {value!r} is not a generation number")


# --- the client ------------------------------------------------------------------------------

class FloxHub:
    def __init__(self, git_url: str, cache_dir: Path, token_file: Path | None = None,
                 timeout: float = 60.0) -> None:
        self.git_url = git_url.rstrip("/")
        self.cache_dir = cache_dir
        self.token_file = token_file
        self.timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}
        self._ready: set[str] = set()  # owners whose clone exists and points at git_url

    @property
    def display_url(self) -> str:
        """The git base without any user:password part, safe for messages."""
        parts = urlsplit(self.git_url)
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))

    def remote_url(self, owner: str) -> str:
        return f"{self.git_url}/{owner}/floxmeta"

    async def resolve(self, ref: EnvRef) -> ResolvedEnv:
        start, outcome = time.monotonic(), "error"
        try:
            resolved = await self._resolve(ref)
            outcome = "ok"
            log.info("resolved %s to generation %d (commit %s)", ref, resolved.generation,
                     resolved.commit[:12])
            return resolved
        finally:
            metrics.FLOXHUB_RESOLVE.labels(outcome=outcome).observe(time.monotonic() - start)

    async def live_commit(self, owner: str, env: str) -> str | None:
        """The commit at the tip of the environment's branch on FloxHub (None: no such env)."""
        EnvRef(owner, env)  # validates both names
        branch = f"refs/heads/{env}"
        try:
            out = await self._git("ls-remote", self.remote_url(owner), branch, remote=True)
        except (_GitFailed, _GitTimeout) as e:
            raise self._remote_error(e, owner, env) from None
        for line in out.decode().splitlines():
            commit, _, name = line.partition("\t")
            if name == branch:
                return commit
        return None

    async def live_generation(self, owner: str, env: str) -> int:
        return (await self.resolve(EnvRef(owner, env))).generation

    # -- resolution ----------------------------------------------------------------------------

    async def _resolve(self, ref: EnvRef) -> ResolvedEnv:
        # A generation never changes once pushed: a pinned one already cached needs no network.
        if ref.generation is not None:
            cached = await self._local_commit(ref.owner, ref.name)
            if cached and await self._has_lockfile(ref, cached, ref.generation):
                return await self._load(ref, cached, ref.generation)
        commit = await self._fetch(ref.owner, ref.name)
        live = await self._live_generation(ref, commit)
        generation = ref.generation if ref.generation is not None else live
        if generation is None:
            raise UnknownGeneration(
                f"environment '{ref}' has no generations yet: push one with `flox push`",
                owner=ref.owner, env=ref.name)
        if not await self._has_lockfile(ref, commit, generation, live=live, strict=True):
            raise MissingLockfile(
                f"generation {generation} of environment '{ref.unpinned}' has no "
                "manifest.lock: lock it (e.g. `flox edit`) and `flox push` a new generation",
                owner=ref.owner, env=ref.name, generation=generation)
        return await self._load(ref, commit, generation)

    async def _live_generation(self, ref: EnvRef, commit: str) -> int | None:
        repo = self._repo(ref.owner)
        try:
            text = await self._git("--git-dir", str(repo), "cat-file", "blob",
                                   f"{commit}:{METADATA_FILE}")
        except _GitFailed:
            raise BadMetadata(f"environment '{ref.unpinned}' (commit {commit[:12]}) has no "
                              f"{METADATA_FILE}: it is not a Flox environment branch",
                              owner=ref.owner, env=ref.name) from None
        try:
            return live_generation_from_metadata(text)
        except ValueError as e:
            raise BadMetadata(f"{METADATA_FILE} of environment '{ref.unpinned}' (commit "
                              f"{commit[:12]}) is invalid: {e}; a newer Flox may have written "
                              "it, upgrade the agent", owner=ref.owner, env=ref.name) from None

    async def _has_lockfile(self, ref: EnvRef, commit: str, generation: int, *,
                            live: int | None = None, strict: bool = False) -> bool:
        """Whether generation's lockfile exists; with `strict`, UnknownGeneration if the
        generation folder is absent altogether."""
        out = await self._git("--git-dir", str(self._repo(ref.owner)), "ls-tree", "-r",
                              "--name-only", commit, "--", f"{generation}/")
        files = out.decode().splitlines()
        if not files and strict:
            raise UnknownGeneration(
                f"environment '{ref.unpinned}' has no generation {generation} (the live "
                f"generation is {live}): pin an existing generation or drop the ':N' to use "
                "the live one", owner=ref.owner, env=ref.name, generation=generation)
        return _lockfile_path(generation) in files

    async def _load(self, ref: EnvRef, commit: str, generation: int) -> ResolvedEnv:
        raw = await self._git("--git-dir", str(self._repo(ref.owner)), "cat-file", "blob",
                              f"{commit}:{_lockfile_path(generation)}")
        try:
            text = raw.decode()
            lockfile = parse_lockfile(text)
        except (UnicodeDecodeError, LockfileError) as e:
            raise BadLockfile(f"manifest.lock of generation {generation} of environment "
                              f"'{ref.unpinned}' is invalid: {e}", owner=ref.owner,
                              env=ref.name, generation=generation) from None
        return ResolvedEnv(ref, generation, lockfile, text, commit)

    # -- the local clone -----------------------------------------------------------------------

    def _repo(self, owner: str) -> Path:
        return self.cache_dir / f"{owner}.git"

    async def _fetch(self, owner: str, env: str) -> str:
        """Fetch the environment's branch into the owner's clone; return its commit."""
        async with self._locks.setdefault(owner, asyncio.Lock()):
            repo = await self._prepare(owner)
            try:
                await self._git("--git-dir", str(repo), "fetch", "--quiet", "--no-tags",
                                "--no-write-fetch-head", "origin",
                                f"+refs/heads/{env}:refs/heads/{env}", remote=True)
            except (_GitFailed, _GitTimeout) as e:
                raise self._remote_error(e, owner, env) from None
            commit = await self._local_commit(owner, env)
        assert commit is not None, "a successful fetch leaves the branch in place"
        return commit

    async def _prepare(self, owner: str) -> Path:
        repo = self._repo(owner)
        if owner not in self._ready or not (repo / "HEAD").exists():
            # `git init` is idempotent; setting the URL each start follows a changed git base,
            # and re-checking HEAD recovers from a cache directory wiped under us.
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            await self._git("init", "--bare", "--quiet", str(repo))
            await self._git("--git-dir", str(repo), "config", "remote.origin.url",
                            self.remote_url(owner))
            await self._git("--git-dir", str(repo), "config", "gc.auto", "0")
            self._ready.add(owner)
        return repo

    async def _local_commit(self, owner: str, env: str) -> str | None:
        repo = self._repo(owner)
        if not (repo / "HEAD").exists():
            return None
        try:
            out = await self._git("--git-dir", str(repo), "rev-parse", "--verify", "--quiet",
                                  f"refs/heads/{env}^{{commit}}")
        except _GitFailed:
            return None
        return out.decode().strip()

    # -- running git ---------------------------------------------------------------------------

    async def _git(self, *args: str, remote: bool = False) -> bytes:
        token = self._token() if remote else None
        proc = await asyncio.create_subprocess_exec(
            "git", *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self._git_env(token),
            start_new_session=True)  # own process group: a kill reaches git-remote-https too
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            raise _GitTimeout() from None
        finally:
            if proc.returncode is None:  # timed out or cancelled: do not leave git running
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if proc.returncode != 0:
            stderr = _redact(err.decode(errors="replace"), token)
            subcommand = next(a for a in args if not a.startswith("-") and "/" not in a)
            log.debug("git %s failed (%d): %s", subcommand, proc.returncode, stderr.strip())
            raise _GitFailed(stderr)
        return out

    def _git_env(self, token: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("GIT_") and k not in ("SSH_ASKPASS", "LANGUAGE")}
        env.update(
            LC_ALL="C",  # English messages: _remote_error matches them
            GIT_TERMINAL_PROMPT="0",  # never wait for a password on a terminal
            GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull,  # no stray helpers
        )
        config = [("credential.helper", "")]
        if token:
            basic = base64.b64encode(f"oauth:{token}".encode()).decode()
            config.append(("http.extraHeader", f"Authorization: Basic {basic}"))
        env["GIT_CONFIG_COUNT"] = str(len(config))
        for i, (key, value) in enumerate(config):
            env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
        return env

    def _token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text().strip() or None
        except FileNotFoundError:
            log.debug("no FloxHub token at %s: accessing FloxHub anonymously", self.token_file)
            return None
        except OSError as e:
            log.warning("cannot read the FloxHub token file %s (%s): accessing FloxHub "
                        "anonymously", self.token_file, e.strerror)
            return None

    def _remote_error(self, error: Exception, owner: str, env: str) -> FloxHubError:
        where = dict(owner=owner, env=env)
        if isinstance(error, _GitTimeout):
            return FloxHubUnreachable(
                f"FloxHub at {self.display_url} did not answer within {self.timeout:g}s for "
                f"'{owner}/{env}': check the network path to FloxHub; will retry", **where)
        stderr = error.stderr if isinstance(error, _GitFailed) else str(error)
        kind = _classify(stderr)
        reason = _last_line(stderr)
        if kind is UnknownEnvironment:
            return UnknownEnvironment(
                f"FloxHub owner '{owner}' has no environment '{env}': check the name in the "
                "reference, or push the environment with `flox push`", **where)
        if kind is UnknownOwner:
            return UnknownOwner(
                f"FloxHub at {self.display_url} has no owner '{owner}' (looking up "
                f"'{owner}/{env}'): check the owner in the reference, and that the token "
                "may read its private environments", **where)
        if kind is AuthenticationFailed:
            # git's own words ("could not read Username...") would only confuse here.
            if self.token_file is None:
                token = "no token is configured"
            elif self._token():
                token = f"the token in {self.token_file} was rejected"
            else:
                token = f"no token was sent ({self.token_file} is missing or empty)"
            return AuthenticationFailed(
                f"FloxHub at {self.display_url} refused access to '{owner}/{env}': {token}; "
                "provide a valid `flox auth token` of an account that can read the "
                "environment", **where)
        if kind is FloxHubUnreachable:
            return FloxHubUnreachable(
                f"cannot reach FloxHub at {self.display_url} for '{owner}/{env}' ({reason}): "
                "check the git URL and the network path to FloxHub; will retry", **where)
        return FloxHubError(f"git failed for '{owner}/{env}' at {self.display_url}: {reason}",
                            **where)


def _lockfile_path(generation: int) -> str:
    return f"{generation}/env/manifest.lock"


_PATTERNS: list[tuple[type[FloxHubError], tuple[str, ...]]] = [
    (UnknownEnvironment, ("couldn't find remote ref",)),
    (UnknownOwner, ("not found", "returned error: 404", "does not appear to be a git repo")),
    (AuthenticationFailed, ("authentication failed", "could not read username",
                            "could not read password", "returned error: 401",
                            "returned error: 403", "access denied")),
    (FloxHubUnreachable, ("could not resolve", "couldn't connect", "failed to connect",
                          "connection refused", "timed out", "connection reset",
                          "returned error: 5", "unable to access", "ssl", "empty reply",
                          "recv failure", "early eof", "unexpected disconnect")),
]


def _classify(stderr: str) -> type[FloxHubError]:
    text = stderr.lower()
    for kind, needles in _PATTERNS:
        if any(needle in text for needle in needles):
            return kind
    return FloxHubError


def _last_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no error output").removeprefix("fatal: ")


def _redact(text: str, token: str | None) -> str:
    if not token:
        return text
    basic = base64.b64encode(f"oauth:{token}".encode()).decode()
    return text.replace(basic, "***").replace(token, "***")
