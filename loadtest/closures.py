"""Realistic closures built with the real Nix, and the binary caches published from them.

Three closures share a base, like Flox environments sharing a runtime:
  - base: many small text-like paths (libraries, share/) plus one large one;
  - web:  base + small binary paths (an app environment; the N-pods scenarios use it);
  - ml:   base + a few paths of hundreds of MB (weights; throughput, RSS, cold start use it).
Sizes are log-uniform between 1 KiB and a per-size ceiling, plus fixed large paths, from a
seeded RNG: the same --size always builds the same store paths, so reruns reuse the store
and the published caches.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.nixenv import Closure, build_closure, make_keypair, nix_env

KIB, MIB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Part:
    count: int  # small paths, log-uniform in [1 KiB, ceiling]
    ceiling: int
    large: tuple[int, ...]  # fixed large paths
    compressible: bool


@dataclass(frozen=True)
class Profile:
    name: str
    base: Part
    web: Part
    ml: Part
    clients: int  # N concurrent nix copy clients (scenarios 3 and 4)
    rss_clients: int  # clients streaming the ml closure while RSS is sampled
    storm_seconds: float  # time bound of each narinfo storm phase


PROFILES: dict[str, Profile] = {
    "tiny": Profile("tiny", Part(6, 64 * KIB, (512 * KIB,), True),
                    Part(4, 32 * KIB, (), False), Part(3, 64 * KIB, (2 * MIB,), False),
                    clients=4, rss_clients=8, storm_seconds=0.5),
    "small": Profile("small", Part(40, 1 * MIB, (8 * MIB,), True),
                     Part(30, 512 * KIB, (4 * MIB,), False),
                     Part(20, 2 * MIB, (60 * MIB,), False),
                     clients=20, rss_clients=50, storm_seconds=2.0),
    "medium": Profile("medium", Part(150, 2 * MIB, (24 * MIB,), True),
                      Part(80, 512 * KIB, (8 * MIB,), False),
                      Part(60, 4 * MIB, (160 * MIB, 60 * MIB), False),
                      clients=50, rss_clients=100, storm_seconds=3.0),
    "large": Profile("large", Part(300, 4 * MIB, (80 * MIB,), True),
                     Part(150, 1 * MIB, (16 * MIB,), False),
                     Part(120, 8 * MIB, (420 * MIB, 300 * MIB, 150 * MIB), False),
                     clients=50, rss_clients=100, storm_seconds=5.0),
}


def _sizes(name: str, part: Part) -> list[int]:
    rng = random.Random(f"loadtest:{name}")
    lo, hi = math.log(KIB), math.log(part.ceiling)
    small = [int(math.exp(rng.uniform(lo, hi))) for _ in range(part.count)]
    sizes = list(part.large) + small
    rng.shuffle(sizes)
    return sizes


@dataclass
class Environments:
    base: Closure
    web: Closure
    ml: Closure

    @property
    def all_paths(self) -> list[str]:
        return sorted(set(self.base.paths) | set(self.web.paths) | set(self.ml.paths))

    def describe(self) -> dict[str, object]:
        return {n: {"paths": len(c.paths), "nar_bytes": c.total_nar_size, "root": c.roots[0]}
                for n, c in (("base", self.base), ("web", self.web), ("ml", self.ml))}


def build(workdir: Path, profile: Profile) -> Environments:
    """Build (or reuse: builds are deterministic) the three closures of `profile`."""
    p = profile
    base = build_closure(workdir, f"lt-{p.name}-base", _sizes(f"{p.name}-base", p.base),
                         compressible=p.base.compressible)
    web = build_closure(workdir, f"lt-{p.name}-web", _sizes(f"{p.name}-web", p.web),
                        shared=base, compressible=p.web.compressible)
    ml = build_closure(workdir, f"lt-{p.name}-ml", _sizes(f"{p.name}-ml", p.ml),
                       shared=base, compressible=p.ml.compressible)
    return Environments(base, web, ml)


@dataclass
class Caches:
    upstream: Path  # xz, signed: what the remote cache serves
    uncompressed: Path  # none, signed: the file:// local limit
    secret_key: Path
    public_key: str


def publish(workdir: Path, envs: Environments, xz_level: int) -> Caches:
    """Publish every path twice: xz (the upstream) and uncompressed (the local limit).

    xz at a low level keeps setup time bounded (xz -6 runs ~2 MB/s on this kind of data); an xz
    decoder's speed depends little on the level, so clients pay a realistic unpack cost.
    """
    keys = workdir / "keys"
    sk, pk = _keypair(keys)
    caches = Caches(workdir / "cache-xz", workdir / "cache-none", sk, pk)
    roots = [envs.web.roots[0], envs.ml.roots[0]]
    _copy_to(caches.upstream, roots, sk, f"compression=xz&compression-level={xz_level}"
             "&parallel-compression=true")
    _copy_to(caches.uncompressed, roots, sk, "compression=none")
    return caches


def _keypair(keys: Path) -> tuple[Path, str]:
    sk, pk = keys / "loadtest-1.sk", keys / "loadtest-1.pk"
    if sk.exists() and pk.exists():
        return sk, pk.read_text().strip()
    return make_keypair(keys, "loadtest-1")


def _copy_to(cache: Path, roots: list[str], sk: Path, params: str) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    url = f"file://{cache.resolve()}?{params}&secret-key={sk.resolve()}"
    proc = subprocess.run(["nix", "copy", "--to", url, *roots], env=nix_env(),
                          capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"publishing to {cache} failed:\n{proc.stderr}")


def narinfo_fields(cache: Path, path: str) -> dict[str, str]:
    """The Key: value fields of `path`'s narinfo in a file cache."""
    text = (cache / f"{Path(path).name.split('-', 1)[0]}.narinfo").read_text()
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def nar_files(cache: Path, paths: list[str]) -> list[tuple[str, int]]:
    """(request path, FileSize) of each path's NAR in a file cache, unique by URL."""
    seen: dict[str, int] = {}
    for p in paths:
        f = narinfo_fields(cache, p)
        seen["/" + f["URL"]] = int(f["FileSize"])
    return sorted(seen.items())


def dump(envs: Environments) -> str:
    return json.dumps(envs.describe(), indent=2)
