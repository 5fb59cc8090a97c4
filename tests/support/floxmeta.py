"""Real floxmeta bare repositories, laid out the way Flox writes them.

`<root>/<owner>/floxmeta` is a bare git repository with one branch per environment. Each branch
holds `metadata.json` (version 2: a `history` of changes, the last entry's `current_generation`
is live) and a folder per generation, `N/env/manifest.toml` + `N/env/manifest.lock`.
Commits are made with git plumbing (temporary index, commit-tree, update-ref), so no worktree.
"""

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "flox", "GIT_AUTHOR_EMAIL": "flox@example.invalid",
    "GIT_COMMITTER_NAME": "flox", "GIT_COMMITTER_EMAIL": "flox@example.invalid",
    "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
}

MANIFEST_TOML = 'version = 1\n\n[install]\n'


class Floxmeta:
    def __init__(self, root: Path) -> None:
        self.root = root

    def repo(self, owner: str) -> Path:
        return self.root / owner / "floxmeta"

    def git(self, owner: str, *args: str, input: bytes | None = None,
            index: Path | None = None) -> str:
        env = {**os.environ, **_GIT_ENV}
        if index is not None:
            env["GIT_INDEX_FILE"] = str(index)
        out = subprocess.run(["git", "--git-dir", str(self.repo(owner)), *args], input=input,
                             env=env, check=True, capture_output=True)
        return out.stdout.decode().strip()

    def create_owner(self, owner: str) -> None:
        if not self.repo(owner).exists():
            self.repo(owner).mkdir(parents=True)
            self.git(owner, "init", "--bare", "-q", "-b", "main")
            # Let clients fetch any commit they saw advertised (like FloxHub does).
            self.git(owner, "config", "uploadpack.allowAnySHA1InWant", "true")

    def branch_commit(self, owner: str, env: str) -> str | None:
        try:
            return self.git(owner, "rev-parse", "--verify", "-q", f"refs/heads/{env}")
        except subprocess.CalledProcessError:
            return None

    def read(self, owner: str, env: str, path: str) -> str:
        return self.git(owner, "show", f"refs/heads/{env}:{path}")

    def metadata(self, owner: str, env: str) -> dict[str, Any]:
        if self.branch_commit(owner, env) is None:
            return {"version": 2, "history": [], "total_generations": 0}
        return json.loads(self.read(owner, env, "metadata.json"))

    def commit(self, owner: str, env: str, files: dict[str, bytes | None], message: str) -> str:
        """Commit `files` (path -> content, None deletes) on top of the branch; returns the id."""
        self.create_owner(owner)
        parent = self.branch_commit(owner, env)
        with tempfile.TemporaryDirectory() as tmp:
            index = Path(tmp) / "index"
            if parent:
                self.git(owner, "read-tree", parent, index=index)
            for path, content in files.items():
                if content is None:
                    self.git(owner, "update-index", "--force-remove", path, index=index)
                    continue
                blob = self.git(owner, "hash-object", "-w", "--stdin", input=content)
                self.git(owner, "update-index", "--add", "--cacheinfo",
                         f"100644,{blob},{path}", index=index)
            tree = self.git(owner, "write-tree", index=index)
        parents = ["-p", parent] if parent else []
        commit = self.git(owner, "commit-tree", tree, *parents, "-m", message)
        self.git(owner, "update-ref", f"refs/heads/{env}", commit, parent or "")
        return commit

    def add_generation(self, owner: str, env: str, lockfile_text: str | None, *,
                       manifest_toml: str = MANIFEST_TOML, kind: str = "edit") -> int:
        """Add generation N+1 and make it live, like `flox push` (None: no lockfile)."""
        meta = self.metadata(owner, env)
        generation = meta["total_generations"] + 1
        history = meta["history"]
        history.append({
            "kind": kind, "author": "tester", "hostname": "ci",
            "timestamp": int(time.time()),
            "current_generation": str(generation),
            "previous_generation": history[-1]["current_generation"] if history else None,
        })
        meta["total_generations"] = generation
        files: dict[str, bytes | None] = {
            "metadata.json": json.dumps(meta).encode(),
            f"{generation}/env/manifest.toml": manifest_toml.encode(),
        }
        if lockfile_text is not None:
            files[f"{generation}/env/manifest.lock"] = lockfile_text.encode()
        self.commit(owner, env, files, f"Create generation {generation}")
        return generation

    def switch_generation(self, owner: str, env: str, generation: int) -> None:
        """Make an existing generation live, like `flox generations switch`."""
        meta = self.metadata(owner, env)
        meta["history"].append({
            "kind": "switch_generation", "author": "tester", "hostname": "ci",
            "timestamp": int(time.time()), "current_generation": str(generation),
            "previous_generation": meta["history"][-1]["current_generation"],
        })
        self.commit(owner, env, {"metadata.json": json.dumps(meta).encode()},
                    f"changed active generation to {generation}")
