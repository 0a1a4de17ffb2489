"""Corrupted or truncated state files (machine.json, network.json, outcome.json): a one-line
error naming the file, `vmctl ps` still lists the other machines, and `vmctl rm` still cleans
up (processes started on the folder, mounts below it, the folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from vmctl.plans import KvmPlan
from vmctl.proc import pid_alive
from vmctl.state import MachineRecord, StateStore

PLAN = KvmPlan(cpus=1, memory=64 << 20, kernel="/k", cmdline="console=ttyS0")
GOOD = MachineRecord(name="good", backend="kvm", plan=PLAN)


def vmctl(state, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VMCTL_STATE_DIR=str(state))
    return subprocess.run([sys.executable, "-m", "vmctl", *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("content", ["", '{"schema": 2, "name": "bad", "back', "[1, 2]", "\x00\x01garbage",
                                     '{"schema": 2, "name": "bad", "backend": "kvm", "created": "soon"}'])
def test_a_broken_machine_json_is_one_line_and_rm_still_removes_it(tmp_path, content):
    store = StateStore(tmp_path)
    store.create(GOOD)
    store.create(MachineRecord(name="bad", backend="kvm", plan=PLAN))
    (store.folder("bad") / "machine.json").write_text(content)
    # A process started on the folder, as the VMM daemon is: rm must not leave it running.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", str(store.folder("bad"))])
    try:
        time.sleep(0.3)
        assert holder.poll() is None
        status = vmctl(tmp_path, "status", "bad")
        assert status.returncode != 0 and "Traceback" not in status.stderr
        assert len(status.stderr.strip().splitlines()) == 1 and "machine.json" in status.stderr, status.stderr
        listed = vmctl(tmp_path, "ps", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [row["name"] for row in json.loads(listed.stdout)] == ["good"]
        assert "vmctl rm bad" in listed.stderr
        removed = vmctl(tmp_path, "rm", "bad")
        assert removed.returncode == 0, removed.stderr
        assert "removed despite an unreadable record" in removed.stderr
        deadline = time.monotonic() + 5
        while holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder.poll() is not None, "a process on the machine's folder survived rm"
        assert not store.folder("bad").exists()
        assert store.names() == ["good"]
    finally:
        holder.kill()
        holder.wait()


def test_rm_of_a_broken_record_unmounts_what_is_below_the_folder(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    store = StateStore(tmp_path)
    store.create(MachineRecord(name="bad", backend="container"))
    (store.folder("bad") / "machine.json").write_text("{")
    rootfs = store.folder("bad") / "rootfs"
    rootfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "soak-test", str(rootfs)], check=True)
    try:
        assert vmctl(tmp_path, "rm", "bad").returncode == 0
        assert str(rootfs) not in open("/proc/self/mounts").read()
        assert not store.folder("bad").exists()
    finally:
        subprocess.run(["umount", str(rootfs)], capture_output=True)


@pytest.mark.parametrize("name", ["network.json", "outcome.json"])
def test_truncated_network_or_outcome_json_does_not_break_ps_or_rm(tmp_path, name):
    store = StateStore(tmp_path)
    store.create(MachineRecord(name="a", backend="kvm", plan=PLAN, pid=2 ** 22 - 1))
    (store.folder("a") / name).write_text('{"tap": "vmc')
    listed = vmctl(tmp_path, "ps", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["name"] == "a"
    assert vmctl(tmp_path, "rm", "a").returncode == 0
    assert not store.folder("a").exists()
    assert not pid_alive(2 ** 22 - 1)


def test_prune_names_a_broken_record_and_leaves_it_to_rm(tmp_path):
    store = StateStore(tmp_path)
    store.create(MachineRecord(name="bad", backend="kvm", plan=PLAN))
    (store.folder("bad") / "machine.json").write_text('{"schema": 2')
    pruned = vmctl(tmp_path, "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "bad: left alone, unreadable record" in pruned.stderr and "vmctl rm bad" in pruned.stderr
    assert vmctl(tmp_path, "rm", "bad").returncode == 0 and not store.folder("bad").exists()
