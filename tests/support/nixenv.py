"""Drive the real Nix (Debian nix-bin 2.8) from tests: build closures, publish, be a cold node.

Everything runs as root against the machine's own /nix/store, with no build users and no
sandbox (REFERENCE §4). Builds are input-addressed and deterministic, so calling a builder
again with the same arguments returns the same store paths at the cost of one evaluation.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BASE_CONFIG = (
    "build-users-group =\n"
    "sandbox = false\n"
    "experimental-features = nix-command\n"
    "substituters =\n"
)
NIX_TOOLS = ("nix", "nix-store", "nix-build")


def nix_env(extra_config: str = "") -> dict[str, str]:
    """os.environ plus the NIX_CONFIG that lets root use Nix without build users."""
    env = dict(os.environ)
    # Root talks to the local store directly; a stray NIX_REMOTE would route to a daemon.
    env.pop("NIX_REMOTE", None)
    env["NIX_CONFIG"] = BASE_CONFIG + (extra_config.rstrip("\n") + "\n" if extra_config else "")
    return env


def missing_tools() -> list[str]:
    return [t for t in NIX_TOOLS if shutil.which(t) is None]


def ensure_store() -> None:
    """Make the directories a fresh `apt-get install nix-bin` may lack (Nix creates the rest)."""
    for d in ("/nix/store", "/nix/var/nix/gcroots", "/nix/var/nix/profiles"):
        Path(d).mkdir(parents=True, exist_ok=True)


def _run(args: list[str], *, extra_config: str = "", env: dict[str, str] | None = None,
         timeout: float = 600) -> str:
    """Run a Nix command that must succeed; raise with its stderr otherwise."""
    proc = subprocess.run(args, env=env or nix_env(extra_config), capture_output=True,
                          text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


@dataclass
class Closure:
    roots: list[str]
    # Every store path of the closure, roots (and any shared closure) included.
    paths: list[str]
    # The paths this build made, root first; each references the next.
    chain: list[str] = field(default_factory=list)
    nar_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def total_nar_size(self) -> int:
        return sum(self.nar_sizes.values())


def _content(seed: str, size: int, compressible: bool) -> bytes:
    rng = random.Random(seed)
    if not compressible:
        # randbytes takes at most 2**31 bits at once
        step = 64 << 20
        return b"".join(rng.randbytes(min(step, size - i)) for i in range(0, size, step))
    words = [b"store", b"path", b"nix", b"cache", b"flox", b"node", b"closure", b"narinfo"]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
    return bytes(out[:size])


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.write_bytes(data)


def _nix_string(s: str) -> str:
    return json.dumps(s).replace("${", "\\${")


_BUILDER = (
    'mkdir -p "$out" && cat "$blob" > "$out/data" && : > "$out/refs" && '
    'for r in $refs; do echo "$r" >> "$out/refs"; done'
)


def _expression(name: str, blobs: list[str], shared_root: str | None) -> str:
    """A Nix list of derivations, root first; derivation i references derivation i+1."""
    lines = ["let", "  mk = name: blob: refs: derivation {",
             '    inherit name refs; builder = "/bin/sh";',
             f"    args = [ \"-c\" {_nix_string(_BUILDER)} ];",
             "    blob = builtins.path { path = blob; name = name + \"-blob\"; };",
             '    system = builtins.currentSystem; PATH = "/bin:/usr/bin";',
             "  };"]
    n = len(blobs)
    for i in reversed(range(n)):
        if i + 1 < n:
            refs = f"[ d{i + 1} ]"
        elif shared_root:
            refs = f"[ (builtins.storePath {_nix_string(shared_root)}) ]"
        else:
            refs = "[ ]"
        lines.append(f"  d{i} = mk {_nix_string(f'{name}-{i}')} ./{blobs[i]} {refs};")
    lines.append("in [ " + " ".join(f"d{i}" for i in range(n)) + " ]")
    return "\n".join(lines) + "\n"


def build_closure(workdir: Path, name: str, sizes: list[int], *, shared: Closure | None = None,
                  compressible: bool = False) -> Closure:
    """Build one store path per size, each referencing the next; the first is the root.

    Path i holds `data` (sizes[i] bytes, seeded by name/index/size so different names
    give different contents) and `refs` (the store path it references). With `shared`,
    the last path also references shared.roots[0].
    """
    if not sizes:
        raise ValueError("sizes must not be empty")
    ensure_store()
    workdir = Path(workdir) / f"closure-{name}"
    workdir.mkdir(parents=True, exist_ok=True)
    blobs = []
    for i, size in enumerate(sizes):
        blob = f"blob-{i}"
        seed = f"{name}:{i}:{size}:{compressible}"
        _write_if_changed(workdir / blob, _content(seed, size, compressible))
        blobs.append(blob)
    shared_root = shared.roots[0] if shared else None
    expr = workdir / "default.nix"
    _write_if_changed(expr, _expression(name, blobs, shared_root).encode())
    # -o registers GC roots so a concurrent `nix-store --gc` cannot delete the paths.
    out = _run(["nix-build", str(expr), "-o", str(workdir / "result")])
    chain = out.split()
    if len(chain) != len(sizes):
        raise RuntimeError(f"nix-build printed {chain!r} for {len(sizes)} derivations")
    nar_sizes = path_nar_sizes(chain[0])
    return Closure(roots=[chain[0]], paths=sorted(nar_sizes), chain=chain, nar_sizes=nar_sizes)


def store_paths_of(root: str, store: Path | str | None = None) -> list[str]:
    """`nix-store -qR root`: the closure of `root` (sorted)."""
    args = ["nix-store"] + (["--store", str(store)] if store else []) + ["-qR", root]
    return sorted(_run(args).split())


def path_nar_sizes(root: str) -> dict[str, int]:
    """NarSize of every path in the closure of `root`."""
    info = json.loads(_run(["nix", "path-info", "--json", "-r", root]))
    return {entry["path"]: int(entry["narSize"]) for entry in info}


def hash_part(path: str) -> str:
    """The 32-character hash part of a store path (the narinfo's name in a binary cache)."""
    return Path(path).name.split("-", 1)[0]


def nar_request_path(cache_dir: Path, path: str) -> str:
    """The request path (e.g. `/nar/<filehash>.nar.xz`) of `path`'s NAR in a published cache."""
    text = (Path(cache_dir) / f"{hash_part(path)}.narinfo").read_text()
    url = next(line[5:] for line in text.splitlines() if line.startswith("URL: "))
    return "/" + url.strip()


def make_keypair(directory: Path, name: str) -> tuple[Path, str]:
    """Generate a binary cache key pair; return (secret key file, public key text)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sk, pk = directory / f"{name}.sk", directory / f"{name}.pk"
    _run(["nix-store", "--generate-binary-cache-key", name, str(sk), str(pk)])
    return sk, pk.read_text().strip()


def publish(paths: list[str], cache_dir: Path, secret_key: Path | None,
            compression: str = "xz", *, store: Path | None = None) -> None:
    """`nix copy` the closures of `paths` (in the chroot store at `store`, or the machine's)
    into a file:// binary cache (signed if a key)."""
    if compression not in ("none", "xz", "zstd"):
        raise ValueError(f"unsupported compression {compression!r}")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    url = f"file://{Path(cache_dir).resolve()}?compression={compression}"
    if secret_key is not None:
        url += f"&secret-key={Path(secret_key).resolve()}"
    source = ["--from", str(Path(store).resolve())] if store else []
    _run(["nix", "copy", *source, "--to", url, *paths])


def add_to_store(path: Path, store: Path) -> str:
    """`nix-store --add` a file or directory into the chroot store at `store`: its store path.
    (A chroot store lives and dies with its directory, so a GiB-sized path leaves nothing in the
    machine's /nix/store.)"""
    return _run(["nix-store", "--store", str(Path(store).resolve()), "--add", str(path)]).strip()


def _copy_config(trusted_keys: list[str], extra_config: str) -> str:
    return (
        f"trusted-public-keys = {' '.join(trusted_keys)}\n"
        "require-sigs = true\n"
        "narinfo-cache-negative-ttl = 0\n"
        "narinfo-cache-positive-ttl = 0\n"
        + extra_config
    )


def _copy_args(source_url: str, dest_root: Path, paths: list[str]) -> list[str]:
    return ["nix", "copy", "--from", source_url, "--to", str(Path(dest_root).resolve()), *paths]


def nix_copy(source_url: str, dest_root: Path, paths: list[str], trusted_keys: list[str], *,
             timeout: float = 300, extra_config: str = "") -> subprocess.CompletedProcess[str]:
    """Be a cold node: copy `paths` from a binary cache into the chroot store at dest_root.

    Signatures are required. Each call gets a private XDG_CACHE_HOME so Nix's narinfo
    cache (binary-cache-v6.sqlite) never leaks between calls. Raises
    subprocess.TimeoutExpired after `timeout` seconds. Useful extra_config knobs:
    `download-attempts = 1`, `stalled-download-timeout = 5`, `connect-timeout = 2`.
    """
    with tempfile.TemporaryDirectory(prefix="nix-xdg-") as xdg:
        env = nix_env(_copy_config(trusted_keys, extra_config))
        env["XDG_CACHE_HOME"] = xdg
        return subprocess.run(_copy_args(source_url, dest_root, paths), env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)


async def nix_copy_async(source_url: str, dest_root: Path, paths: list[str],
                         trusted_keys: list[str], *, timeout: float = 300,
                         extra_config: str = "") -> subprocess.CompletedProcess[str]:
    """nix_copy without blocking the event loop (for tests serving from the same loop)."""
    return await run_nix_async(_copy_args(source_url, dest_root, paths),
                               _copy_config(trusted_keys, extra_config), timeout)


async def run_nix_async(args: list[str], config: str,
                        timeout: float) -> subprocess.CompletedProcess[str]:
    """A Nix command with `config` and a cache directory of its own, without blocking the
    event loop; killed after `timeout` seconds (subprocess.TimeoutExpired)."""
    with tempfile.TemporaryDirectory(prefix="nix-xdg-") as xdg:
        env = {**nix_env(config), "XDG_CACHE_HOME": xdg}
        proc = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise subprocess.TimeoutExpired(args, timeout) from None
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def path_valid_in(dest_root: Path, path: str) -> bool:
    """Whether `path` is a valid (registered, complete) path of the chroot store at dest_root."""
    proc = subprocess.run(
        ["nix-store", "--store", str(Path(dest_root).resolve()), "--check-validity", path],
        env=nix_env(), capture_output=True, text=True, check=False)
    return proc.returncode == 0
