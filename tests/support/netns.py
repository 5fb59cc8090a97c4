"""Separate test hosts on one machine: network namespaces on a private bridge.

    with Network() as net:           # bridge fncb<tag> at 10.251.N.1/24 in the root namespace
        a = net.add_host()           # namespace fnc-peers-<tag>-0 at 10.251.N.10, veth to bridge
        net.run(a, ["ip", "addr"])   # a command inside it
        net.cut(a)                   # its link goes down: packets to it vanish (no refusal)
        net.heal(a)

Servers in the test process bind the bridge address (`net.gateway`), which every namespace
reaches. Everything created is removed on exit, also after a failure; names carry the pid so
concurrent runs do not collide, and the subnet is one no interface on the machine uses.
Needs root and `ip netns` (iproute2); `unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"fnc-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> str:
    """A 10.251.N prefix that no interface of the root namespace is on."""
    used = _ip("-4", "-o", "addr", "show").stdout
    for n in [os.getpid() % 250, *range(250)]:
        prefix = f"10.251.{n}"
        if f" {prefix}." not in used:
            return prefix
    raise RuntimeError("no free 10.251.N.0/24 subnet for test hosts")


@dataclass
class Host:
    index: int
    namespace: str
    address: str
    veth: str  # the bridge side, in the root namespace

    def exec_prefix(self) -> list[str]:
        """Prepend to a command to run it inside this host."""
        return ["ip", "netns", "exec", self.namespace]


class Network:
    def __init__(self) -> None:
        self.tag = str(os.getpid())  # interface names stay within 15 characters
        self.bridge = f"fncb{self.tag}"
        self.prefix = _free_subnet()
        self.gateway = f"{self.prefix}.1"
        self.hosts: list[Host] = []

    def __enter__(self) -> Network:
        reap_stale()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self) -> Host:
        i = len(self.hosts)
        host = Host(i, f"fnc-peers-{self.tag}-{i}", f"{self.prefix}.{10 + i}",
                    f"fnch{self.tag}x{i}")
        self.hosts.append(host)  # before creating anything, so close() removes it all
        inner = f"fncn{self.tag}x{i}"
        ns = host.namespace
        _ip("netns", "add", ns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("-n", ns, "link", "set", inner, "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "set", host.veth, "master", self.bridge)
        _ip("link", "set", host.veth, "up")
        return host

    def run(self, host: Host, args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*host.exec_prefix(), *args], capture_output=True, text=True,
                              check=False, **kw)  # type: ignore[call-overload]

    def cut(self, host: Host) -> None:
        """Take the host off the network: the bridge drops its frames, so whoever talks to it
        waits for a timeout (a black hole, not a refusal). This kernel has no netem, so
        dropping at the link is how packets are lost."""
        _ip("link", "set", host.veth, "down")

    def heal(self, host: Host) -> None:
        _ip("link", "set", host.veth, "up")

    def close(self) -> None:
        for host in self.hosts:
            _ip("link", "del", host.veth, check=False)
            _ip("netns", "del", host.namespace, check=False)
        self.hosts.clear()
        _ip("link", "del", self.bridge, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def reap_stale() -> None:
    """Remove what runs killed before their cleanup left behind (their pid is gone): the
    processes still inside their namespaces, the namespaces, the bridges and links."""
    for ns in _ip("netns", "list").stdout.split():
        m = re.fullmatch(r"fnc-peers-(\d+)-\d+", ns)
        if m and not _alive(int(m.group(1))):
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", ns, check=False)
    for link in re.findall(r"^\d+: (fnc[bh]\d+(?:x\d+)?)[@:]", _ip("-o", "link", "show").stdout,
                           re.MULTILINE):
        pid = int(re.sub(r"x\d+$", "", link[4:]))
        if not _alive(pid):
            _ip("link", "del", link, check=False)


def leftovers(tag: str) -> list[str]:
    """Namespaces and links of run `tag` still present (for the harness's own test)."""
    names = _ip("netns", "list").stdout + _ip("-o", "link", "show").stdout
    return [w for w in names.split() if tag in w and ("fnc" in w)]

