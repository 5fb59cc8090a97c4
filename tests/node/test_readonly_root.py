"""The agent's container has a read-only root filesystem (only /tmp and its volumes are
writable): the nix-store client it runs must need nothing else."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nixdaemon import NixDaemon, NodeRelay, open_up, scratch_dir
from tests.support.nixenv import Closure

REPO = Path(__file__).resolve().parents[2]

CLIENT = """
import asyncio, sys
from pathlib import Path
from agent.node.nixstore import NodeStore
store = NodeStore(Path(sys.argv[1]))
async def main():
    assert await store.invalid([sys.argv[2]]) == {sys.argv[2]}
    await store.realise(sys.argv[2], Path(sys.argv[3]))
    assert await store.invalid([sys.argv[2]]) == set()
asyncio.run(main())
print(Path(sys.argv[3]).readlink())
"""


@pytest.fixture
def daemon(published_cache: Path, signing_key: tuple[Path, str]) -> Iterator[NixDaemon]:
    with scratch_dir("realise-ro-") as d, NixDaemon(
            d, substituters=[f"file://{published_cache}"], keys=[signing_key[1]]) as daemon:
        yield daemon


def test_the_client_writes_nothing_outside_tmp_and_the_roots(daemon: NixDaemon,
                                                             small_closure: Closure) -> None:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed")
    with NodeRelay(daemon) as relay, scratch_dir("realise-ro-tmp-") as writable:
        open_up(writable)
        link = writable / "roots" / "holder" / "root"
        # A private mount namespace whose root is read-only; `writable` (tmpfs) plays the
        # container's /tmp emptyDir and its roots volume.
        script = (f"set -e; mount --make-rprivate /; mount -t tmpfs tmpfs {writable}; "
                  f"mkdir -p {link.parent}; mount -o remount,ro,bind /; "
                  "if [ -w /usr ]; then echo 'root is writable' >&2; exit 9; fi; "
                  f'TMPDIR={writable} PYTHONPATH={REPO} exec "$0" -c "$1" "$2" "$3" "$4"')
        proc = subprocess.run(["unshare", "-m", "sh", "-c", script, sys.executable, CLIENT,
                               str(relay.socket), small_closure.roots[0], str(link)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == small_closure.roots[0]
    assert all(daemon.valid(p) for p in small_closure.paths)
