"""FloxHub resolution against real floxmeta repositories served by git's own smart HTTP."""

import asyncio
import logging
import shutil
import socket
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from agent.flox import floxhub as floxhub_module
from agent.flox.floxhub import (
    AuthenticationFailed,
    BadLockfile,
    BadMetadata,
    EnvRef,
    FloxHub,
    FloxHubError,
    FloxHubUnreachable,
    MissingLockfile,
    RefError,
    UnknownEnvironment,
    UnknownGeneration,
    UnknownOwner,
    live_generation_from_metadata,
)
from agent.flox.lockfile import parse_lockfile
from tests.support.fixtures import FIXTURES
from tests.support.floxmeta import Floxmeta
from tests.support.gitserver import GitHTTPServer, dead_url

GENERATIONS = [(FIXTURES / "floxhub-generations" / f"gen{n}.manifest.lock").read_text()
               for n in range(1, 7)]
TOKEN = "flox-token-7c1d-SECRET-e9f2"
WRONG = "wrong-token-41aa-SECRET"


@pytest.fixture
def floxmeta(tmp_path: Path) -> Floxmeta:
    meta = Floxmeta(tmp_path / "floxhub")
    for text in GENERATIONS:
        meta.add_generation("alice", "k8s-tools", text)
    meta.add_generation("alice", "hello", GENERATIONS[0])
    return meta


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret" / "token"
    path.parent.mkdir()
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def hub(server: GitHTTPServer, tmp_path: Path, token_file: Path) -> FloxHub:
    return FloxHub(server.url, tmp_path / "cache", token_file, timeout=20)


async def error_of(hub: FloxHub, ref: str) -> FloxHubError:
    with pytest.raises(FloxHubError) as e:
        await hub.resolve(EnvRef.parse(ref))
    return e.value


# --- references ------------------------------------------------------------------------------

def test_envref_parse_and_str() -> None:
    live = EnvRef.parse("alice/k8s-tools")
    assert live == EnvRef("alice", "k8s-tools", None)
    pinned = EnvRef.parse(" alice/k8s-tools:7 ")
    assert pinned == EnvRef("alice", "k8s-tools", 7)
    assert str(live) == "alice/k8s-tools" and str(pinned) == "alice/k8s-tools:7"
    assert pinned.unpinned == live
    assert EnvRef.parse("Org_1/env.v2:12").generation == 12


@pytest.mark.parametrize(("text", "message"), [
    ("", "expected 'owner/env' or 'owner/env:N'"),
    ("hello", "expected 'owner/env' or 'owner/env:N'"),
    ("/env", "owner is empty"),
    ("alice/", "environment name is empty"),
    ("alice/:3", "environment name is empty"),
    ("alice/env:", "generation '' is not a decimal number"),
    ("alice/env:latest", "generation 'latest' is not a decimal number"),
    ("alice/env:-1", "generation '-1' is not a decimal number"),
    ("alice/env:0", "generation must be a positive number"),
    ("alice/env/x", "cannot contain '/'"),
    ("../env", "owner '..' contains '..'"),
    ("alice/..", "contains '..'"),
    ("alice/a..b", "contains '..'"),
    ("alice/-env", "must start with a letter or digit"),
    ("al ice/env", "must start with a letter or digit"),
    ("alice/env~1", "must start with a letter or digit"),
    ("alice/env.lock", "cannot end with '.' or '.lock'"),
])
def test_envref_rejects(text: str, message: str) -> None:
    with pytest.raises(RefError, match="invalid environment reference") as e:
        EnvRef.parse(text)
    assert message in str(e.value)
    with pytest.raises(ValueError):
        EnvRef.parse(text)


def test_metadata_versions() -> None:
    v2 = ('{"version": 2, "total_generations": 3, "future": 1, "history": ['
          '{"kind": "install", "targets": ["hello"], "current_generation": "1"},'
          '{"kind": "brand_new_kind", "current_generation": "3", "previous_generation": "1",'
          ' "extra": {"x": 1}},'
          '{"kind": "switch_generation", "current_generation": "2",'
          ' "previous_generation": "3"}]}')
    assert live_generation_from_metadata(v2) == 2
    assert live_generation_from_metadata('{"version": 2, "history": []}') is None
    v1 = '{"currentGen": "4", "generations": {"4": {"created": 1}}, "version": 1}'
    assert live_generation_from_metadata(v1) == 4
    for text, message in [("{", "not JSON"), ("[]", "not a JSON object"),
                          ('{"version": 3}', "unsupported metadata version 3"),
                          ('{"version": 2}', "'history' is missing"),
                          ('{"version": 2, "history": [{"current_generation": "x"}]}',
                           "current_generation 'x' is not a generation number")]:
        with pytest.raises(ValueError, match=message):
            live_generation_from_metadata(text)


# --- resolving -------------------------------------------------------------------------------

async def test_resolve_live_generation(hub: FloxHub, floxmeta: Floxmeta) -> None:
    resolved = await hub.resolve(EnvRef.parse("alice/k8s-tools"))
    assert resolved.generation == 6
    assert resolved.lockfile_text == GENERATIONS[5]
    assert resolved.lockfile == parse_lockfile(GENERATIONS[5])
    assert resolved.commit == floxmeta.branch_commit("alice", "k8s-tools")
    assert resolved.ref == EnvRef("alice", "k8s-tools")
    assert len(resolved.lockfile.roots("x86_64-linux")) == 12


async def test_resolve_every_pinned_generation(hub: FloxHub) -> None:
    for n, text in enumerate(GENERATIONS, start=1):
        resolved = await hub.resolve(EnvRef("alice", "k8s-tools", n))
        assert (resolved.generation, resolved.lockfile_text) == (n, text)
    other = await hub.resolve(EnvRef.parse("alice/hello"))
    assert (other.generation, other.lockfile_text) == (1, GENERATIONS[0])


async def test_live_follows_a_generation_switch(hub: FloxHub, floxmeta: Floxmeta) -> None:
    floxmeta.switch_generation("alice", "k8s-tools", 3)
    resolved = await hub.resolve(EnvRef.parse("alice/k8s-tools"))
    assert (resolved.generation, resolved.lockfile_text) == (3, GENERATIONS[2])


async def test_incremental_fetch_sees_a_push(hub: FloxHub, floxmeta: Floxmeta,
                                             server: GitHTTPServer) -> None:
    first = await hub.resolve(EnvRef.parse("alice/k8s-tools"))
    assert first.generation == 6
    assert floxmeta.add_generation("alice", "k8s-tools", GENERATIONS[1]) == 7
    server.requests.clear()
    second = await hub.resolve(EnvRef.parse("alice/k8s-tools"))
    assert (second.generation, second.lockfile_text) == (7, GENERATIONS[1])
    assert second.commit != first.commit
    assert ("POST", "/alice/floxmeta/git-upload-pack") in server.requests
    # A cached pinned generation never changes: no network needed.
    server.requests.clear()
    assert (await hub.resolve(EnvRef.parse("alice/k8s-tools:6"))).lockfile_text == GENERATIONS[5]
    assert server.requests == []
    # Only the needed branch is fetched into the owner's single clone.
    refs = floxmeta.git("alice", "--git-dir", str(hub.cache_dir / "alice.git"), "for-each-ref",
                        "--format=%(refname)")
    assert refs.split() == ["refs/heads/k8s-tools"]


async def test_pinned_generation_after_push_is_fetched(hub: FloxHub, floxmeta: Floxmeta) -> None:
    await hub.resolve(EnvRef.parse("alice/k8s-tools:2"))
    floxmeta.add_generation("alice", "k8s-tools", GENERATIONS[0])
    assert (await hub.resolve(EnvRef.parse("alice/k8s-tools:7"))).lockfile_text == GENERATIONS[0]


async def test_live_commit(hub: FloxHub, floxmeta: Floxmeta) -> None:
    assert await hub.live_commit("alice", "k8s-tools") == floxmeta.branch_commit(
        "alice", "k8s-tools")
    assert await hub.live_commit("alice", "absent") is None
    with pytest.raises(UnknownOwner):
        await hub.live_commit("nobody", "k8s-tools")
    assert await hub.live_generation("alice", "hello") == 1


async def test_concurrent_resolves_of_one_owner(hub: FloxHub) -> None:
    refs = ["alice/k8s-tools", "alice/hello", *(f"alice/k8s-tools:{n}" for n in range(1, 7)),
            "alice/k8s-tools", "alice/hello"]
    results = await asyncio.gather(*(hub.resolve(EnvRef.parse(r)) for r in refs))
    assert [r.generation for r in results] == [6, 1, 1, 2, 3, 4, 5, 6, 6, 1]
    assert results[2].lockfile_text == GENERATIONS[0]
    assert results[0].commit == results[8].commit


async def test_resolve_records_metrics(hub: FloxHub) -> None:
    name = "flox_node_cache_floxhub_resolve_duration_seconds_count"

    def count(outcome: str) -> float:
        return REGISTRY.get_sample_value(name, {"outcome": outcome}) or 0.0

    ok, error = count("ok"), count("error")
    await hub.resolve(EnvRef.parse("alice/hello"))
    with pytest.raises(UnknownEnvironment):
        await hub.resolve(EnvRef.parse("alice/nope"))
    assert (count("ok"), count("error")) == (ok + 1, error + 1)


# --- errors ----------------------------------------------------------------------------------

async def test_error_classes_and_messages(hub: FloxHub, floxmeta: Floxmeta,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    errors = []

    e = await error_of(hub, "nobody/k8s-tools")
    assert isinstance(e, UnknownOwner) and "owner 'nobody'" in str(e)
    errors.append(e)

    e = await error_of(hub, "alice/absent")
    assert isinstance(e, UnknownEnvironment)
    assert "owner 'alice' has no environment 'absent'" in str(e) and "flox push" in str(e)
    errors.append(e)

    e = await error_of(hub, "alice/k8s-tools:99")
    assert isinstance(e, UnknownGeneration)
    assert "'alice/k8s-tools' has no generation 99 (the live generation is 6)" in str(e)
    assert e.generation == 99
    errors.append(e)

    assert floxmeta.add_generation("alice", "k8s-tools", None) == 7
    for ref in ("alice/k8s-tools", "alice/k8s-tools:7"):
        e = await error_of(hub, ref)
        assert isinstance(e, MissingLockfile)
        assert "generation 7 of environment 'alice/k8s-tools' has no manifest.lock" in str(e)
        errors.append(e)

    floxmeta.commit("alice", "hello", {"metadata.json": b'{"version": 9}'}, "future flox")
    e = await error_of(hub, "alice/hello")
    assert isinstance(e, BadMetadata) and "unsupported metadata version 9" in str(e)
    errors.append(e)

    floxmeta.add_generation("alice", "broken", '{"lockfile-version": 1}')
    e = await error_of(hub, "alice/broken")
    assert isinstance(e, BadLockfile) and "no 'packages' list" in str(e)
    errors.append(e)

    for e in errors:
        assert e.owner == "alice" or e.owner == "nobody"
        assert TOKEN not in str(e)
    assert TOKEN not in caplog.text


async def test_wrong_or_missing_token(server: GitHTTPServer, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = tmp_path / "wrong-token"
    wrong.write_text(WRONG)
    hub = FloxHub(server.url, tmp_path / "cache", wrong, timeout=20)
    for call in (hub.resolve(EnvRef.parse("alice/k8s-tools")),
                 hub.live_commit("alice", "k8s-tools")):
        with pytest.raises(AuthenticationFailed) as e:
            await call
        assert "refused access to 'alice/k8s-tools'" in str(e.value)
        assert f"the token in {wrong} was rejected" in str(e.value)
        assert WRONG not in str(e.value) and TOKEN not in str(e.value)
    anonymous = FloxHub(server.url, tmp_path / "cache2", tmp_path / "absent", timeout=20)
    with pytest.raises(AuthenticationFailed, match="no token was sent"):
        await anonymous.resolve(EnvRef.parse("alice/k8s-tools"))
    assert WRONG not in caplog.text and TOKEN not in caplog.text


async def test_token_rotation_is_picked_up(hub: FloxHub, server: GitHTTPServer,
                                           token_file: Path) -> None:
    await hub.resolve(EnvRef.parse("alice/hello"))
    server.token = "rotated-token"
    with pytest.raises(AuthenticationFailed):
        await hub.resolve(EnvRef.parse("alice/hello"))
    token_file.write_text("rotated-token")
    assert (await hub.resolve(EnvRef.parse("alice/hello"))).generation == 1


async def test_token_stays_off_command_lines_and_config(
        hub: FloxHub, monkeypatch: pytest.MonkeyPatch) -> None:
    argvs: list[tuple[str, ...]] = []
    real = asyncio.create_subprocess_exec

    async def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        argvs.append(args)
        return await real(*args, **kwargs)

    monkeypatch.setattr(floxhub_module.asyncio, "create_subprocess_exec", spy)
    await hub.resolve(EnvRef.parse("alice/k8s-tools"))
    await hub.live_commit("alice", "k8s-tools")
    assert any("fetch" in argv for argv in argvs)
    assert all(TOKEN not in arg for argv in argvs for arg in argv)
    config = (hub.cache_dir / "alice.git" / "config").read_text()
    assert f"url = {hub.git_url}/alice/floxmeta" in config
    assert TOKEN not in config and "extraHeader" not in config


async def test_unreachable(tmp_path: Path, token_file: Path) -> None:
    hub = FloxHub(dead_url(), tmp_path / "cache", token_file, timeout=20)
    e = await error_of(hub, "alice/k8s-tools")
    assert isinstance(e, FloxHubUnreachable)
    assert "cannot reach FloxHub" in str(e) and "'alice/k8s-tools'" in str(e)
    with pytest.raises(FloxHubUnreachable):
        await hub.live_commit("alice", "k8s-tools")


async def test_silent_server_times_out(tmp_path: Path, token_file: Path) -> None:
    # Connections are accepted by the kernel, but nothing ever answers.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        hub = FloxHub(url, tmp_path / "cache", token_file, timeout=1)
        e = await error_of(hub, "alice/k8s-tools")
    assert isinstance(e, FloxHubUnreachable) and "did not answer within 1s" in str(e)
    assert TOKEN not in str(e)


async def test_wiped_cache_is_recreated(hub: FloxHub) -> None:
    await hub.resolve(EnvRef.parse("alice/hello"))
    shutil.rmtree(hub.cache_dir)
    assert (await hub.resolve(EnvRef.parse("alice/k8s-tools:3"))).lockfile_text == GENERATIONS[2]
