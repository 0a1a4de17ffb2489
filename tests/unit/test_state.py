"""The state directory: machine records, outcomes, the lock, and telling live VMMs from dead ones."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap

import pytest

from vmctl.errors import VmctlError
from vmctl.plans import KvmPlan
from vmctl.proc import pid_alive
from vmctl.state import MachineRecord, StateStore

PLAN = KvmPlan(cpus=2, memory=256 << 20, kernel="/k", cmdline="console=ttyS0")


def test_records_round_trip_and_are_listed_by_name(tmp_path):
    store = StateStore(tmp_path)
    assert store.names() == []
    store.create(MachineRecord(name="web", backend="kvm", plan=PLAN, pid=123, resources={"disks": ["a"]}))
    store.create(MachineRecord(name="db", backend="kvm", ephemeral=True))
    assert store.names() == ["db", "web"]
    web = store.load("web")
    assert (web.plan, web.pid, web.resources, web.ephemeral) == (PLAN, 123, {"disks": ["a"]}, False)
    web.pid = 456
    store.save(web)
    assert store.load("web").pid == 456
    assert not list(store.folder("web").glob(".*.tmp"))  # saved through a temporary + rename
    store.delete("web")
    assert store.names() == ["db"] and not store.folder("web").exists()


def test_errors_name_the_machine_and_the_file(tmp_path):
    store = StateStore(tmp_path)
    store.create(MachineRecord(name="a", backend="kvm"))
    with pytest.raises(VmctlError, match=r"machine 'a' already exists \(vmctl rm a first\)"):
        store.create(MachineRecord(name="a", backend="kvm"))
    with pytest.raises(VmctlError, match=r"^no machine named 'b' \(machines: a\)$"):
        store.load("b")
    (store.folder("a") / "machine.json").write_text("{not json")
    with pytest.raises(VmctlError, match=r"a/machine.json: unreadable machine record"):
        store.load("a")


def test_outcome_and_network_are_read_when_present(tmp_path):
    store = StateStore(tmp_path)
    store.create(MachineRecord(name="a", backend="kvm"))
    assert store.outcome("a") is None and store.network("a") is None
    (store.folder("a") / "outcome.json").write_text(json.dumps({"exit_code": 3, "reason": "r", "crashed": False}))
    (store.folder("a") / "network.json").write_text(json.dumps({"tap": "vmctl7", "guest_ip": "172.30.0.2"}))
    assert store.outcome("a")["exit_code"] == 3 and store.network("a")["tap"] == "vmctl7"
    (store.folder("a") / "outcome.json").write_text("half-writ")
    assert store.outcome("a") is None


def test_the_lock_excludes_another_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from vmctl.state import StateStore
            with StateStore(Path({str(tmp_path)!r})).locked():
                print("locked", flush=True)
                sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with open(tmp_path / "machines" / ".lock") as handle:
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        with StateStore(tmp_path).locked():  # free again once the holder is done
            with open(tmp_path / "machines" / ".lock") as handle:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        holder.kill()
        holder.wait()


def test_pid_alive_tells_running_from_gone_and_zombie():
    assert pid_alive(os.getpid())
    assert not pid_alive(None) and not pid_alive(0)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert not pid_alive(child.pid)
    child.wait()
    assert not pid_alive(child.pid)
