"""Snapshots and the VMM sandbox (VMCTL_SANDBOX=1, vmm/sandbox.py), through the real CLI with a
tiny counting guest: a sandboxed machine is snapshotted and a sandboxed clone continues the
saved count; a clone of a snapshot taken without the sandbox runs in the sandbox too."""

from __future__ import annotations

import json
import time

import pytest

from vmctl.vmm.sandbox import available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


@pytest.fixture
def spec(tmp_path, assemble, monkeypatch):
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    kernel = assemble("counter.S", LIMIT=10_000_000, DELAY=20000)
    path = tmp_path / "vm.yaml"
    path.write_text(f"machines:\n  counter:\n    kernel: {kernel}\n    memory: 64M\n    disks:\n      - size: 16M\n")
    return path


def _lines(vmctl_cli, name: str, count: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        numbers = [int(line) for line in vmctl_cli("logs", name).stdout.split() if line.isdigit()]
        if len(numbers) >= count:
            return numbers
        assert time.monotonic() < deadline, f"{name} printed only {numbers}"
        time.sleep(0.1)


def _running(vmctl_cli) -> dict[str, str]:
    return {row["name"]: row["state"] for row in json.loads(vmctl_cli("ps", "--json").stdout)}


def test_a_sandboxed_machine_is_snapshotted_and_its_sandboxed_clone_continues(spec, tmp_path, vmctl_cli,
                                                                             monkeypatch):
    monkeypatch.setenv("VMCTL_SANDBOX", "1")
    try:
        assert vmctl_cli("up", str(spec), "--no-wait").returncode == 0
        _lines(vmctl_cli, "counter", 3)
        sandbox = json.loads((tmp_path / "state" / "machines" / "counter" / "sandbox.json").read_text())
        assert sandbox["seccomp"] == "filter"
        created = vmctl_cli("snapshot", "create", "--memory", "counter", "snap")
        assert created.returncode == 0, created.stderr
        saved = _saved_count(tmp_path)
        before = len(_lines(vmctl_cli, "counter", 1))
        _lines(vmctl_cli, "counter", before + 2)  # the source goes on counting
        up = vmctl_cli("up", "--from-snapshot", "snap", "--name", "clone")
        assert up.returncode == 0, up.stderr
        tail = _lines(vmctl_cli, "clone", 4)[1:]  # the first line may end the one being printed
        assert tail == list(range(tail[0], tail[0] + len(tail))) and saved <= tail[0] <= saved + 2, (saved, tail)
        assert _running(vmctl_cli) == {"counter": "running", "clone": "running"}
    finally:
        vmctl_cli("rm", "counter")
        vmctl_cli("rm", "clone")
        vmctl_cli("snapshot", "delete", "snap")


def test_a_clone_runs_in_the_sandbox_and_continues_the_count(spec, tmp_path, vmctl_cli, monkeypatch):
    try:
        assert vmctl_cli("up", str(spec), "--no-wait").returncode == 0
        _lines(vmctl_cli, "counter", 3)
        created = vmctl_cli("snapshot", "create", "--memory", "counter", "snap")
        assert created.returncode == 0, created.stderr
        assert vmctl_cli("rm", "counter").returncode == 0
        saved = _saved_count(tmp_path)
        monkeypatch.setenv("VMCTL_SANDBOX", "1")
        up = vmctl_cli("up", "--from-snapshot", "snap", "--name", "clone")
        assert up.returncode == 0, up.stderr
        sandbox = json.loads((tmp_path / "state" / "machines" / "clone" / "sandbox.json").read_text())
        assert sandbox["seccomp"] == "filter" and sandbox["no_new_privs"]
        # The clone goes on from the saved count; its first line may be the end of the one
        # being printed when the snapshot was taken, so it is left out.
        tail = _lines(vmctl_cli, "clone", 4)[1:]
        assert tail == list(range(tail[0], tail[0] + len(tail))) and saved <= tail[0] <= saved + 2, (saved, tail)
        assert _running(vmctl_cli) == {"clone": "running"}
    finally:
        vmctl_cli("rm", "counter")
        vmctl_cli("rm", "clone")
        vmctl_cli("snapshot", "delete", "snap")


def _saved_count(tmp_path) -> int:
    import struct

    memory = (tmp_path / "state" / "snapshots" / "snap" / "memory").read_bytes()
    return int(struct.unpack_from("<Q", memory, 0x6F00)[0])  # counter.S keeps its count there
