"""Flox `manifest.lock` (lockfile-version 1): which store paths an environment puts on a node.

Three entry shapes share the `packages` list, one entry per package per system:
catalog (`outputs`, `outputs_to_install`), flake (`outputs`, `outputs-to-install`) and
store path (`store_path`). Unknown fields are ignored: newer Flox versions add fields.
"""

import json
import platform
from dataclasses import dataclass
from typing import Any

from agent.nix.storepath import StorePath, StorePathError

SUPPORTED_VERSION = 1
_MACHINES = {
    "x86_64": "x86_64-linux",
    "amd64": "x86_64-linux",
    "aarch64": "aarch64-linux",
    "arm64": "aarch64-linux",
}


class LockfileError(ValueError):
    pass


@dataclass(frozen=True)
class LockedPackage:
    install_id: str
    system: str
    # (output name, store path) pairs in lockfile order; a tuple keeps the dataclass hashable.
    outputs: tuple[tuple[str, str], ...]
    # None when the lockfile does not say: then every output is installed.
    outputs_to_install: tuple[str, ...] | None
    store_path: str | None = None

    def install_paths(self, *, all_outputs: bool = False) -> list[str]:
        if self.store_path is not None:
            return [self.store_path]
        if all_outputs or self.outputs_to_install is None:
            return [path for _, path in self.outputs]
        by_name = dict(self.outputs)
        return [by_name[name] for name in self.outputs_to_install]


@dataclass(frozen=True)
class Lockfile:
    packages: tuple[LockedPackage, ...]

    def systems(self) -> set[str]:
        return {p.system for p in self.packages}

    def roots(self, system: str, *, all_outputs: bool = False) -> list[str]:
        """Sorted, deduplicated store paths this environment lands on a `system` node."""
        paths = {path for p in self.packages if p.system == system
                 for path in p.install_paths(all_outputs=all_outputs)}
        return sorted(paths)


def node_system(machine: str | None = None) -> str:
    """The Nix system of this (Linux) node, e.g. `x86_64-linux`."""
    machine = (machine or platform.machine()).lower()
    try:
        return _MACHINES[machine]
    except KeyError:
        raise ValueError(f"unsupported machine architecture {machine!r}") from None


def parse_lockfile(data: str | bytes) -> Lockfile:
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LockfileError(f"lockfile is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise LockfileError(f"lockfile is not a JSON object but {_kind(doc)}")
    version = doc.get("lockfile-version")
    if version != SUPPORTED_VERSION:
        raise LockfileError(f"unsupported lockfile-version {version!r} "
                            f"(expected {SUPPORTED_VERSION})")
    if "packages" not in doc:
        raise LockfileError("lockfile has no 'packages' list")
    packages = doc["packages"]
    if not isinstance(packages, list):
        raise LockfileError(f"'packages' is {_kind(packages)}, not a list")
    return Lockfile(tuple(_parse_entry(i, entry) for i, entry in enumerate(packages)))


def _parse_entry(index: int, entry: Any) -> LockedPackage:
    where = f"packages[{index}]"
    if not isinstance(entry, dict):
        raise LockfileError(f"{where} is {_kind(entry)}, not an object")
    install_id = entry.get("install_id")
    if install_id is not None:
        if not isinstance(install_id, str):
            raise LockfileError(f"{where}: install_id is {_kind(install_id)}, not a string")
        where = f"{where} (install_id {install_id!r})"
    system = entry.get("system")
    if not isinstance(system, str) or not system:
        raise LockfileError(f"{where}: missing or invalid 'system'")
    if "store_path" in entry:
        path = _store_path(where, "store_path", entry["store_path"])
        return LockedPackage(install_id or "", system, (), None, store_path=path)
    outputs = _outputs(where, entry)
    to_install = _outputs_to_install(where, entry, outputs)
    return LockedPackage(install_id or "", system, outputs, to_install)


def _outputs(where: str, entry: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    outputs = entry.get("outputs")
    if outputs is None:
        raise LockfileError(f"{where}: has neither 'outputs' nor 'store_path'")
    if not isinstance(outputs, dict) or not outputs:
        raise LockfileError(f"{where}: 'outputs' must be a non-empty object")
    return tuple((name, _store_path(where, f"outputs.{name}", path))
                 for name, path in outputs.items())


def _outputs_to_install(where: str, entry: dict[str, Any],
                        outputs: tuple[tuple[str, str], ...]) -> tuple[str, ...] | None:
    # Catalog entries spell it with underscores, flake entries with hyphens.
    key = "outputs_to_install" if "outputs_to_install" in entry else "outputs-to-install"
    names = entry.get(key)
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LockfileError(f"{where}: '{key}' must be a list of output names")
    known = {name for name, _ in outputs}
    for name in names:
        if name not in known:
            raise LockfileError(f"{where}: '{key}' names output {name!r}, "
                                f"which is not in outputs {sorted(known)}")
    return tuple(names)


def _store_path(where: str, field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise LockfileError(f"{where}: {field} is {_kind(value)}, not a store path")
    try:
        StorePath.parse(value)
    except StorePathError:
        raise LockfileError(f"{where}: {field} is not a store path: {value!r}") from None
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), f"a {type(value).__name__}")
