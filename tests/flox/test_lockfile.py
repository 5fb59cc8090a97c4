import copy
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.flox.lockfile import Lockfile, LockfileError, node_system, parse_lockfile
from agent.nix.nix32 import ALPHABET
from tests.support.fixtures import FIXTURES

LOCKFILES = sorted((FIXTURES / "lockfiles").glob("*.lock"))
GENERATIONS = sorted((FIXTURES / "floxhub-generations").glob("*.lock"))
LINUX = ("x86_64-linux", "aarch64-linux")

H1 = "/nix/store/" + "a" * 32 + "-hello-2.12"
H2 = "/nix/store/" + "b" * 32 + "-hello-2.12-man"
H3 = "/nix/store/" + "c" * 32 + "-curl-8"


def load(path: Path) -> Lockfile:
    return parse_lockfile(path.read_text())


def doc(*packages: dict) -> dict:
    return {"lockfile-version": 1, "manifest": {"version": 1}, "packages": list(packages)}


def catalog(install_id: str = "hello", system: str = "x86_64-linux", **extra) -> dict:
    entry = {"attr_path": install_id, "install_id": install_id, "system": system,
             "outputs": {"out": H1, "man": H2}, "outputs_to_install": ["out"],
             "priority": 5, "group": "toplevel"}
    entry.update(extra)
    return entry


def test_fixture_folders_are_present() -> None:
    assert len(LOCKFILES) == 9
    assert len(GENERATIONS) == 6


@pytest.mark.parametrize("path", LOCKFILES + GENERATIONS, ids=lambda p: p.name)
def test_every_fixture_parses_with_linux_roots(path: Path) -> None:
    lock = load(path)
    raw = json.loads(path.read_text())
    assert len(lock.packages) == len(raw["packages"])
    for system in LINUX:
        roots = lock.roots(system)
        assert roots == sorted(set(roots))
        # Installed outputs are a subset of all outputs.
        assert set(roots) <= set(lock.roots(system, all_outputs=True))
        assert all(r.startswith("/nix/store/") for r in roots)


def test_empty_lockfile_has_no_roots() -> None:
    lock = load(FIXTURES / "lockfiles" / "empty.manifest.lock")
    assert lock.packages == ()
    assert lock.systems() == set()
    assert lock.roots("x86_64-linux") == []


def test_hello_roots_per_system() -> None:
    lock = load(FIXTURES / "lockfiles" / "hello.manifest.lock")
    assert lock.systems() == {"aarch64-darwin", "aarch64-linux", "x86_64-darwin",
                              "x86_64-linux"}
    assert lock.roots("x86_64-linux") == [
        "/nix/store/nm7p8wxflggcwxfzayhysq4z6a1wg373-hello-2.12.3"]
    assert lock.roots("aarch64-linux") == [
        "/nix/store/qpp9968dpkv1c755nk13mrkrzpsvah18-hello-2.12.3"]
    assert lock.roots("riscv64-linux") == []


def test_generation_roots_follow_outputs_to_install() -> None:
    lock = load(FIXTURES / "floxhub-generations" / "gen1.manifest.lock")
    x86 = lock.roots("x86_64-linux")
    assert x86 == sorted([
        "/nix/store/2hgbs9rps8sc7yfyijgvgdksg4bnhrs2-k9s-0.50.9",
        "/nix/store/myld9sswhrl252bjrr60nl2ls9338vf3-kind-0.30.0",
        "/nix/store/75afy3w5985pck1f7bvwwq7gzawf9i9c-kubectl-1.33.4-man",
        "/nix/store/abp5rhv8vnij5k08m5id75vdq4nnkqqq-kubectl-1.33.4",
        "/nix/store/liiq6r71mhpg6d3rs25mb2h7xacq2aj2-kubectx-0.9.5",
    ])
    # kubectl's `convert` output is not installed, but is prefetched with all_outputs.
    convert = "/nix/store/1yhls3wrancjn52md7552kyalbh7dd5b-kubectl-1.33.4-convert"
    assert convert not in x86
    assert lock.roots("x86_64-linux", all_outputs=True) == sorted([*x86, convert])
    arm = lock.roots("aarch64-linux")
    assert "/nix/store/a95sq4yvhbrh4njn49glnp2xmbd3k3q1-kubectl-1.33.4" in arm
    assert not set(arm) & set(x86)


def test_duplicate_outputs_to_install_are_deduplicated() -> None:
    lock = load(FIXTURES / "lockfiles" / "gcc_boost.manifest.lock")
    roots = lock.roots("x86_64-linux")
    assert len(roots) == 5
    assert "/nix/store/8zgdzwmrfrrcpsvfrqz557sc8vf85qxk-boost-1.89.0" in roots
    assert "/nix/store/hl9mnablabykyx4q5dw7a9cdp2m1pclh-boost-1.89.0-dev" not in roots
    assert len(lock.roots("x86_64-linux", all_outputs=True)) == 11


def test_flake_entries_use_hyphenated_keys() -> None:
    lock = load(FIXTURES / "lockfiles" / "flake_hello.manifest.lock")
    assert lock.roots("x86_64-linux") == [
        "/nix/store/i3zw7h6pg3n9r5i63iyqxrapa70i4v5w-hello-2.12.2"]
    assert lock.roots("aarch64-linux") == [
        "/nix/store/rdi64cigphnc1f28lxlxay51cxnfa3vs-hello-2.12.2"]
    flake = {"install_id": "hello", "system": "x86_64-linux", "locked-url": "github:a/b",
             "outputs": {"out": H1, "man": H2}, "outputs-to-install": ["man"]}
    assert parse_lockfile(json.dumps(doc(flake))).roots("x86_64-linux") == [H2]


def test_store_path_entries() -> None:
    entry = {"install_id": "mine", "store_path": H3, "system": "aarch64-linux", "priority": 5}
    lock = parse_lockfile(json.dumps(doc(entry, catalog())))
    assert lock.roots("aarch64-linux") == [H3]
    assert lock.roots("aarch64-linux", all_outputs=True) == [H3]
    assert lock.roots("x86_64-linux") == [H1]


def test_missing_outputs_to_install_installs_every_output() -> None:
    entry = catalog()
    del entry["outputs_to_install"]
    assert parse_lockfile(json.dumps(doc(entry))).roots("x86_64-linux") == sorted([H1, H2])


def test_unknown_fields_are_ignored() -> None:
    data = doc(catalog(future_field={"x": [1, 2]}, another=None))
    data["something-new"] = 42
    data["manifest"]["brand-new"] = True
    assert parse_lockfile(json.dumps(data).encode()).roots("x86_64-linux") == [H1]


def bad(mutate) -> str:
    data = doc(catalog("curl", "aarch64-linux"), catalog(), catalog("jq"), catalog("hello"))
    mutate(data)
    with pytest.raises(LockfileError) as e:
        parse_lockfile(json.dumps(data))
    return str(e.value)


def test_not_json() -> None:
    with pytest.raises(LockfileError, match="not JSON"):
        parse_lockfile("{lockfile-version: 1")
    with pytest.raises(LockfileError, match="not JSON"):
        parse_lockfile(b"\xff\xfe")
    with pytest.raises(LockfileError, match="not a JSON object"):
        parse_lockfile("[1, 2]")


def test_wrong_version() -> None:
    assert "unsupported lockfile-version 0 (expected 1)" in bad(
        lambda d: d.update({"lockfile-version": 0}))
    assert "unsupported lockfile-version None" in bad(lambda d: d.pop("lockfile-version"))


def test_missing_or_invalid_packages() -> None:
    assert "no 'packages' list" in bad(lambda d: d.pop("packages"))
    assert "'packages' is an object, not a list" in bad(lambda d: d.update(packages={}))
    assert "packages[1] is a string, not an object" in bad(
        lambda d: d["packages"].__setitem__(1, "hello"))


def test_entry_without_system() -> None:
    msg = bad(lambda d: d["packages"][2].pop("system"))
    assert msg == "packages[2] (install_id 'jq'): missing or invalid 'system'"


def test_entry_without_outputs() -> None:
    msg = bad(lambda d: d["packages"][3].pop("outputs"))
    assert msg == "packages[3] (install_id 'hello'): has neither 'outputs' nor 'store_path'"
    assert "'outputs' must be a non-empty object" in bad(
        lambda d: d["packages"][0].update(outputs={}))


def test_bad_store_path() -> None:
    msg = bad(lambda d: d["packages"][3]["outputs"].update(out="/usr/bin/hello"))
    assert msg == ("packages[3] (install_id 'hello'): outputs.out is not a store path: "
                   "'/usr/bin/hello'")
    short = "/nix/store/abc-hello"
    assert f"store_path is not a store path: '{short}'" in bad(
        lambda d: d["packages"].append({"install_id": "x", "system": "x86_64-linux",
                                        "store_path": short}))
    assert "outputs.out is a list, not a store path" in bad(
        lambda d: d["packages"][0]["outputs"].update(out=[H1]))


def test_outputs_to_install_must_name_outputs() -> None:
    msg = bad(lambda d: d["packages"][1].update(outputs_to_install=["bin"]))
    assert "packages[1] (install_id 'hello'): 'outputs_to_install' names output 'bin'" in msg
    assert "must be a list of output names" in bad(
        lambda d: d["packages"][1].update(outputs_to_install="out"))


def test_node_system() -> None:
    assert node_system("x86_64") == "x86_64-linux"
    assert node_system("aarch64") == "aarch64-linux"
    assert node_system("arm64") == "aarch64-linux"
    assert node_system() in LINUX
    with pytest.raises(ValueError, match="unsupported machine"):
        node_system("s390x")


store_paths = st.builds(lambda h, n: f"/nix/store/{h}-{n}",
                        st.text(ALPHABET, min_size=32, max_size=32),
                        st.from_regex(r"[a-z][a-z0-9.+-]{0,20}", fullmatch=True))


@given(st.lists(st.tuples(st.sampled_from(LINUX), st.dictionaries(
    st.sampled_from(["out", "man", "dev", "lib"]), store_paths, min_size=1)), max_size=8))
def test_roots_are_exactly_the_installed_outputs(entries) -> None:
    packages = [{"install_id": f"p{i}", "system": system, "outputs": outputs,
                 "outputs_to_install": sorted(outputs)[:1]}
                for i, (system, outputs) in enumerate(entries)]
    lock = parse_lockfile(json.dumps(doc(*copy.deepcopy(packages))))
    for system in LINUX:
        mine = [p for p in packages if p["system"] == system]
        expected = {p["outputs"][p["outputs_to_install"][0]] for p in mine}
        assert lock.roots(system) == sorted(expected)
        everything = {path for p in mine for path in p["outputs"].values()}
        assert lock.roots(system, all_outputs=True) == sorted(everything)
