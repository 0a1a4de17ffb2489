"""`vmctl image prune`: stale image folders go, current ones and those still used stay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmctl.cli import main as cli_main
from vmctl.disk.qcow2.create import create, create_overlay
from vmctl.images import prune


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    for current in prune.current_dirs(cache):
        (current / "tree").mkdir(parents=True)
    for folder in ("kernel/src", "kernel/work", "kernel/0ld", "rootfs/busybox-0ld",
                   "rootfs/debian-0ld", "rootfs/bench-0ld", "rootfs/bench-base-0ld"):
        (cache / folder).mkdir(parents=True)
        (cache / folder / "file").write_bytes(b"x" * 10000)
    monkeypatch.setenv("VMCTL_CACHE_DIR", str(cache))
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    return cache


def test_only_stale_unused_folders_are_removed(cache: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    machine = state / "machines" / "web"
    machine.mkdir(parents=True)
    # a machine's overlay backs onto an old debian base (relative name, as vmctl writes it)
    create(str(cache / "rootfs/debian-0ld/rootfs.qcow2"), 1 << 20)
    create_overlay(str(cache / "rootfs/debian-0ld/rootfs.qcow2"), str(machine / "disk.qcow2"))
    # a stopped container's record names an old tree
    (machine / "container.json").write_text(json.dumps({"rootfs": str(cache / "rootfs/bench-0ld/tree")}))
    # and this process holds a file of the old kernel open
    with open(cache / "kernel/0ld/file", "rb"):
        assert cli_main(["image", "prune"]) == 0
    out = capsys.readouterr().out

    assert not (cache / "rootfs/busybox-0ld").exists()
    assert not (cache / "rootfs/bench-base-0ld").exists()
    for kept in ("rootfs/debian-0ld", "rootfs/bench-0ld", "kernel/0ld", "kernel/src", "kernel/work"):
        assert (cache / kept).is_dir(), kept
    for current in prune.current_dirs(cache):
        assert current.is_dir()
    assert "backing file of" in out and "named in" in out and "open in process" in out
    assert "freed" in out


def test_dry_run_removes_nothing(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["image", "prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (cache / "rootfs/busybox-0ld").is_dir()
    assert "stale" in out and "would free" in out


def test_an_empty_cache_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    assert cli_main(["image", "prune", "--cache-dir", str(tmp_path / "none")]) == 0
    assert "nothing to prune" in capsys.readouterr().out
