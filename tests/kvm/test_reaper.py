"""Guests never outlive their owner: a pytest session killed with -9 takes its guests (VMM,
TAP, overlays, state) along within seconds; `vmctl up --owner-pid`; `vmctl prune`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmctl.proc import pid_alive
from vmctl.reaper import owner_of, sweep_orphan_taps
from vmctl.state import StateStore


def wait_for(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - start


def machines(state: Path) -> list[str]:
    folder = state / "machines"
    return sorted(p.name for p in folder.iterdir() if (p / "machine.json").exists()) if folder.exists() else []


def tap_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def test_pytest_killed_with_9_leaves_nothing(tmp_path, assemble):
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing")
    state = tmp_path / "state"
    kernel = assemble("ready.S")
    test_file = tmp_path / "test_owned.py"
    test_file.write_text(textwrap.dedent(f"""
        import time
        from pathlib import Path

        def test_sleeps_with_guests(vmctl_guest):
            for index in range(2):
                vmctl_guest({{"name": f"owned{{index}}", "kernel": "{kernel}", "memory": "32M", "network": "isolated"}})
            Path("{tmp_path / 'started'}").write_text("yes")
            time.sleep(600)
    """))
    env = dict(os.environ, VMCTL_STATE_DIR=str(state))
    runner = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (tmp_path / "started").exists() or runner.poll() is not None, 120, "guests started")
        assert runner.poll() is None, "the inner pytest ended early"
        names = machines(state)
        assert len(names) == 2
        store = StateStore(state)
        records = [store.load(name) for name in names]
        assert all(r.owner and r.owner["pid"] == runner.pid for r in records)
        vmm_pids = [r.pid for r in records]
        taps = [store.network(name)["tap"] for name in names]
        assert all(pid_alive(pid) for pid in vmm_pids) and all(tap_exists(tap) for tap in taps)
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        seconds = wait_for(lambda: not machines(state) and not any(pid_alive(p) for p in vmm_pids)
                           and not any(tap_exists(t) for t in taps), 20, "machines reaped")
        print(f"reaped in {seconds:.1f} s")
        assert not any((state / "machines" / name).exists() for name in names)
        assert not list((state / "reapers").glob("*.lock"))  # the watchdog is gone too
    finally:
        if runner.poll() is None:
            runner.kill()


def test_up_with_owner_pid(tmp_path, assemble, vmctl_cli, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("VMCTL_STATE_DIR", str(state))
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  owned:\n    kernel: {assemble('ready.S')}\n    memory: 32M\n")
    owner = subprocess.Popen(["sleep", "600"])
    try:
        result = vmctl_cli("up", str(spec), "--owner-pid", str(owner.pid))
        assert result.returncode == 0, result.stderr
        record = StateStore(state).load("owned")
        assert record.owner == owner_of(owner.pid)
        owner.kill()
        owner.wait()
        wait_for(lambda: not machines(state) and not pid_alive(record.pid), 20, "machine reaped")
    finally:
        owner.kill()
    bad = vmctl_cli("up", str(spec), "--owner-pid", "999999999")
    assert bad.returncode == 1 and "no such process" in bad.stderr and not machines(state)


def test_prune_removes_machines_of_dead_owners_and_orphan_taps(tmp_path, assemble, vmctl_cli, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("VMCTL_STATE_DIR", str(state))
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  kept:\n    kernel: {assemble('ready.S')}\n    memory: 32M\n"
                    f"  orphan:\n    kernel: {assemble('ready.S')}\n    memory: 32M\n")
    assert vmctl_cli("up", str(spec)).returncode == 0
    store = StateStore(state)
    orphan = store.load("orphan")
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan.owner = {"pid": gone.pid, "start": 1}  # an owner that no longer exists
    store.save(orphan)
    # a persistent TAP of ours that nothing holds (what a killed libvirt start leaves)
    tap = "vmctlp" + str(os.getpid() % 100000)
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    try:
        assert sweep_orphan_taps(prefix=tap) == []  # no alias: not known to be ours
        subprocess.run(["ip", "link", "set", "dev", tap, "alias", f"vmctl:{state / 'machines' / 'kept'}"], check=True)
        assert sweep_orphan_taps(prefix=tap) == []  # its machine exists
        subprocess.run(["ip", "link", "set", "dev", tap, "alias", f"vmctl:{state / 'machines' / 'gone'}"], check=True)
        assert sweep_orphan_taps(prefix=tap) == [tap] and not tap_exists(tap)
    finally:
        if tap_exists(tap):
            subprocess.run(["ip", "link", "del", tap])
    result = vmctl_cli("prune")
    assert result.returncode == 0, result.stderr
    assert "orphan: removed (its owner" in result.stderr
    assert machines(state) == ["kept"] and not pid_alive(orphan.pid)
    assert vmctl_cli("rm", "kept").returncode == 0


@pytest.mark.parametrize("keep", [True, False])
def test_keep_on_failure(tmp_path, assemble, keep, vmctl_cli, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("VMCTL_STATE_DIR", str(state))
    test_file = tmp_path / "test_fails.py"
    test_file.write_text(textwrap.dedent(f"""
        def test_fails(vmctl_guest):
            vmctl_guest({{"name": "inspect", "kernel": "{assemble('ready.S')}", "memory": "32M"}})
            assert False, "boom"
    """))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file),
                             *(["--vmctl-keep-on-failure"] if keep else [])],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    if not keep:
        wait_for(lambda: not machines(state), 20, "guest removed")
        return
    (name,) = machines(state)
    assert f"vmctl: kept {name} for inspection" in result.stdout
    time.sleep(2)  # the owner is gone: the watchdog ran, and left the kept guest alone
    record = StateStore(state).load(name)
    assert record.owner is None and pid_alive(record.pid)
    assert vmctl_cli("rm", name).returncode == 0
