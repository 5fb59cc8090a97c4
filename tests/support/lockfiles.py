"""Flox lockfiles that point at closures the tests built."""

import json


def lockfile_for(*roots: str) -> str:
    """A lockfile-version 1 with one store-path entry per root, for both Linux systems."""
    packages = [{"install_id": f"pkg{i}", "store_path": root, "system": system, "priority": 5,
                 "some_future_field": {"ignored": True}}
                for i, root in enumerate(roots) for system in ("x86_64-linux", "aarch64-linux")]
    return json.dumps({"lockfile-version": 1, "manifest": {"version": 1}, "packages": packages})
