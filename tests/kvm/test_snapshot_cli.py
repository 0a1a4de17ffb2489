"""Snapshots, clones and stop/start of native machines through the real CLI (tiny guests)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest

COUNTER = 0x6F00  # counter.S keeps its count here


@pytest.fixture
def env(tmp_path, assemble, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("VMCTL_STATE_DIR", str(state))
    spec = tmp_path / "vm.yaml"
    kernel = assemble("counter.S", LIMIT=10_000_000, DELAY=20000)
    spec.write_text(f"machines:\n  counter:\n    kernel: {kernel}\n    memory: 64M\n    disks:\n      - size: 16M\n")
    return spec, state


def _ps(vmctl_cli) -> dict:
    result = vmctl_cli("ps", "--json")
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def _wait_log_lines(vmctl_cli, name: str, count: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = vmctl_cli("logs", name).stdout
        if log.count("\n") >= count:
            return log
        assert time.monotonic() < deadline, f"{name} printed only {log!r}"
        time.sleep(0.1)


def _one_error_line(result) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmctl: error: "), result.stderr
    return lines[0]


def test_memory_snapshot_clones_stop_start_and_delete(env, vmctl_cli):
    spec, state = env
    try:
        assert vmctl_cli("up", str(spec), "--no-wait").returncode == 0
        _wait_log_lines(vmctl_cli, "counter", 5)
        created = vmctl_cli("snapshot", "create", "--memory", "counter", "ready")
        assert created.returncode == 0, created.stderr
        snap = state / "snapshots" / "ready"
        saved = struct.unpack_from("<Q", (snap / "memory").read_bytes(), COUNTER)[0]
        # The source went on, over a new overlay above the frozen (read-only) layer.
        assert _ps(vmctl_cli)["counter"]["state"] == "running"
        assert not os.access(snap / "disk0.qcow2", os.W_OK) or os.geteuid() == 0
        assert oct((snap / "disk0.qcow2").stat().st_mode & 0o777) == "0o444"

        for clone in ("c1", "c2"):
            up = vmctl_cli("up", "--from-snapshot", "ready", "--name", clone)
            assert up.returncode == 0, up.stderr
            assert f"{clone}: ready in" in up.stderr
        logs = [_wait_log_lines(vmctl_cli, clone, 5) for clone in ("c1", "c2")]
        expected = "".join(f"{n}\n" for n in range(saved, saved + 4))
        for log in logs:
            # The saved guest had counted to `saved` and was printing it, or waiting after it:
            # the clone finishes that line (if anything of it is left), then saved+1, +2, ...
            assert any(log.startswith(expected[skip:]) for skip in range(len(str(saved)) + 2)), (saved, log[:200])
        listing = vmctl_cli("snapshot", "list", "--json")
        assert [(s["name"], s["machine"], s["kind"], s["layers"]) for s in json.loads(listing.stdout)] == \
            [("ready", "counter", "memory", 1)]

        refused = _one_error_line(vmctl_cli("snapshot", "delete", "ready"))
        assert "machine c1" in refused and "machine c2" in refused and "machine counter (running)" in refused
        assert vmctl_cli("rm", "c1", "c2").returncode == 0

        assert vmctl_cli("stop", "counter", "--timeout", "1").returncode == 0
        assert _ps(vmctl_cli)["counter"]["state"] == "stopped"
        assert vmctl_cli("start", "counter", "--no-wait").returncode == 0
        assert _ps(vmctl_cli)["counter"]["state"] == "running"
        assert vmctl_cli("stop", "counter", "--timeout", "1").returncode == 0

        deleted = vmctl_cli("snapshot", "delete", "ready")  # only the stopped source reads it: merged
        assert deleted.returncode == 0 and "1 overlay(s) of counter merged" in deleted.stderr
        assert not snap.exists()
        assert vmctl_cli("start", "counter", "--no-wait").returncode == 0  # its disk still opens
        assert _ps(vmctl_cli)["counter"]["state"] == "running"
    finally:
        for name in ("counter", "c1", "c2"):  # one by one: rm stops at an unknown name
            vmctl_cli("rm", name)


def test_damaged_or_unknown_snapshots_are_refused_and_leave_nothing(env, vmctl_cli):
    spec, state = env
    try:
        assert vmctl_cli("up", str(spec), "--no-wait").returncode == 0
        _wait_log_lines(vmctl_cli, "counter", 2)
        assert vmctl_cli("snapshot", "create", "--memory", "counter", "s").returncode == 0
        state_file = state / "snapshots" / "s" / "state"
        data = bytearray(state_file.read_bytes())
        data[100] ^= 1
        state_file.write_bytes(bytes(data))
        error = _one_error_line(vmctl_cli("up", "--from-snapshot", "s", "--name", "bad"))
        assert f"{state_file}: checksum mismatch" in error
        assert "bad" not in _ps(vmctl_cli)
        assert not (state / "machines" / "bad").exists()

        assert "no snapshot named 'nope'" in _one_error_line(vmctl_cli("up", "--from-snapshot", "nope", "--name", "x"))
        assert "already exists" in _one_error_line(vmctl_cli("snapshot", "create", "counter", "s"))
        layer = state / "snapshots" / "s" / "disk0.qcow2"
        os.chmod(layer, 0o644)
        layer.unlink()
        assert "disk layer of snapshot 's' is missing" in _one_error_line(
            vmctl_cli("up", "--from-snapshot", "s", "--name", "x"))
        # An interrupted creation: a folder without meta.json is listed, never used, deletable.
        (state / "snapshots" / "half").mkdir()
        assert "interrupted" in vmctl_cli("snapshot", "list").stdout
        assert "incomplete snapshot" in _one_error_line(vmctl_cli("up", "--from-snapshot", "half", "--name", "x"))
        assert vmctl_cli("snapshot", "delete", "half").returncode == 0
    finally:
        vmctl_cli("rm", "counter")


def test_pytest_pattern_boot_once_then_a_fresh_clone_each_time(assemble, tmp_path, monkeypatch):
    from vmctl.testing import clone, snapshot_of

    state = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))  # Unix socket paths must stay short
    monkeypatch.setenv("VMCTL_STATE_DIR", str(state))
    kernel = assemble("counter.S", LIMIT=10_000_000, DELAY=20000, READY=1)
    firsts = []
    with snapshot_of({"kernel": str(kernel), "memory": "64M", "disks": [{"size": "8M"}]}) as snapshot:
        assert (state / "snapshots" / snapshot / "memory").exists()
        for _ in range(2):
            with clone(snapshot) as vm:
                deadline = time.monotonic() + 60
                while vm.console_log.count("\n") < 3:
                    assert time.monotonic() < deadline, vm.console_log
                    time.sleep(0.05)
                firsts.append(vm.console_log.splitlines()[:2])
                assert "VMCTL-READY" not in vm.console_log  # restored past the boot, not booted
    assert firsts[0] == firsts[1]  # each clone starts from the same saved guest
    assert sorted(p.name for p in (state / "machines").iterdir()) == [".lock"]
    assert list((state / "snapshots").iterdir()) == []
    shutil.rmtree(state)


def test_snapshot_in_yaml_starts_a_clone(env, vmctl_cli, tmp_path):
    spec, state = env
    try:
        assert vmctl_cli("up", str(spec), "--no-wait").returncode == 0
        _wait_log_lines(vmctl_cli, "counter", 3)
        assert vmctl_cli("snapshot", "create", "--memory", "counter", "y").returncode == 0
        clones = tmp_path / "clones.yaml"
        clones.write_text("machines:\n  from-yaml:\n    snapshot: y\n")
        up = vmctl_cli("up", str(clones))
        assert up.returncode == 0 and "from-yaml: started from snapshot y" in up.stderr, up.stderr
        assert _ps(vmctl_cli)["from-yaml"]["state"] == "running"
        assert _wait_log_lines(vmctl_cli, "from-yaml", 2).splitlines()[1].isdigit()
    finally:
        for name in ("from-yaml", "counter"):
            vmctl_cli("rm", name)


def test_kill_9_while_snapshotting_leaves_the_disk_intact_and_nothing_that_looks_complete(env, vmctl_cli, tmp_path):
    import signal
    import subprocess
    import sys

    spec, state = env
    big = tmp_path / "big.yaml"  # 1 GiB guest: its RAM takes a while to write
    big.write_text(spec.read_text().replace("memory: 64M", "memory: 1G"))
    try:
        assert vmctl_cli("up", str(big), "--no-wait").returncode == 0
        _wait_log_lines(vmctl_cli, "counter", 2)
        pid = _ps(vmctl_cli)["counter"]["pid"]
        exe = Path(sys.executable).with_name("vmctl")
        creating = subprocess.Popen([str(exe), "snapshot", "create", "--memory", "counter", "cut"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        folder = state / "snapshots" / "cut"
        deadline = time.monotonic() + 30
        # the disk is switched and the 1 GiB of RAM is being written (hashed, holes left): kill then
        while not (folder / "memory").exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
        _, errors = creating.communicate(timeout=60)
        assert creating.returncode == 1 and errors.startswith("vmctl: error: ") and errors.count("\n") == 1, errors
        assert not (folder / "meta.json").exists()  # nothing that looks complete
        # The failed `create` removed what it had begun, merging the frozen layer back into
        # the (now stopped) machine's new overlay; a killed `create` would leave the folder,
        # listed as interrupted, for `delete` to do the same.
        assert not folder.exists()
        assert "cut" not in vmctl_cli("snapshot", "list").stdout
        # The machine's disk is whole (qemu-img agrees), and it boots again from it.
        disk = state / "machines" / "counter" / "disks" / "disk0.qcow2"
        check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert vmctl_cli("start", "counter", "--no-wait").returncode == 0
        _wait_log_lines(vmctl_cli, "counter", 2)
        assert _ps(vmctl_cli)["counter"]["state"] == "running"
    finally:
        vmctl_cli("rm", "counter")


def test_delete_of_an_interrupted_snapshot_merges_its_layer_back(env, vmctl_cli):
    from vmctl.snapshot.disk_layers import backing_of, freeze_overlay

    spec, state = env
    try:
        assert vmctl_cli("up", str(spec), "--no-wait").returncode == 0
        _wait_log_lines(vmctl_cli, "counter", 2)
        assert vmctl_cli("stop", "counter", "--timeout", "1").returncode == 0
        disk = state / "machines" / "counter" / "disks" / "disk0.qcow2"
        folder = state / "snapshots" / "half"  # what a `create` killed after the disk switch leaves
        folder.mkdir(parents=True)
        freeze_overlay(disk, folder / "disk0.qcow2")
        assert Path(backing_of(disk)).parent == folder
        assert "interrupted" in vmctl_cli("snapshot", "list").stdout
        deleted = vmctl_cli("snapshot", "delete", "half")
        assert deleted.returncode == 0 and "1 overlay(s) merged back" in deleted.stderr, deleted.stderr
        assert not folder.exists() and backing_of(disk) is None
        assert vmctl_cli("start", "counter", "--no-wait").returncode == 0
        _wait_log_lines(vmctl_cli, "counter", 2)
    finally:
        vmctl_cli("rm", "counter")
