"""The SQLite index on its own: pending rows, the narinfo cache, stale pending cleanup."""

import time
from pathlib import Path

from agent.store.index import Index, NarInfoRow, NarRow


def _rows(n: int, committed: bool = False) -> tuple[NarRow, NarInfoRow]:
    h = str(n) * 32
    file = f"nar/{str(n) * 52}.nar.xz"
    nar = NarRow(file, f"sha256:{'0' * 52}", 100, "xz", None, 50, "http://up/", "nar/x", False)
    info = NarInfoRow(h, f"/nix/store/{h}-p{n}", file, f"StorePath: /nix/store/{h}-p{n}\n", (),
                      committed)
    return nar, info


def test_stale_pending_rows_are_forgotten_and_committed_ones_kept(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    for n in (1, 2):
        index.put_pending(*_rows(n))
    index.mark_nar_committed(_rows(2)[0].file, 50)
    index.mark_narinfo_committed(_rows(2)[1].hash)
    time.sleep(0.05)
    assert index.forget_stale_pending(0.01) == 1
    assert index.narinfo(_rows(1)[1].hash) is None
    assert index.nar(_rows(1)[0].file) is None
    assert index.narinfo(_rows(2)[1].hash) is not None


def test_the_narinfo_cache_never_serves_a_removed_entry(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    nar, info = _rows(3)
    index.put_pending(nar, info)
    index.mark_nar_committed(nar.file, 50)
    index.mark_narinfo_committed(info.hash)
    assert index.narinfo(info.hash).committed  # now cached
    index.remove_nar(nar.file)
    assert index.narinfo(info.hash) is None
