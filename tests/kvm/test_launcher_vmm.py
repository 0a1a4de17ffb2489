"""VMMs forked by the launcher: what they inherit, and what happens when either end dies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmctl.launcher import client
from vmctl.proc import pid_alive

VMCTL = shutil.which("vmctl", path=os.path.dirname(sys.executable)) or "vmctl"


@pytest.fixture
def socket_path(tmp_path):
    folder = tmp_path / "launcher"
    folder.mkdir(mode=0o700)
    return str(folder / "launcher.sock")


@pytest.fixture
def launcher(socket_path):
    process = subprocess.Popen([sys.executable, "-m", "vmctl.launcher", "serve", socket_path, "--idle", "120"],
                               stdin=subprocess.DEVNULL)
    assert client.wait_for_server(socket_path, 60)
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def start_forever(assemble, socket_path: str) -> tuple[subprocess.Popen, int]:
    """`vmctl boot` of a guest that never ends, through the launcher; (client, VMM pid)."""
    env = {**os.environ, "VMCTL_LAUNCHER": socket_path}
    env.pop(client.ENV, None)
    vmm_client = subprocess.Popen([VMCTL, "boot", "--kernel", str(assemble("forever.S")), "--timeout", "120"],
                                  env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    server_pid = int(Path(socket_path + ".pid").read_text())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid in children(server_pid):
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:kvm-vcpu:0" for fd in os.listdir(f"/proc/{pid}/fd")
                   if os.path.exists(f"/proc/{pid}/fd/{fd}")):
                return vmm_client, pid
        time.sleep(0.05)
    vmm_client.kill()
    raise AssertionError(f"no VMM with a vCPU under the launcher: {vmm_client.communicate(timeout=10)}")


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pid_alive(pid)


def test_a_launched_vmm_holds_only_its_own_fds(assemble, launcher, socket_path):
    server_pid = launcher.pid
    server_sockets = {os.readlink(f"/proc/{server_pid}/fd/{fd}") for fd in os.listdir(f"/proc/{server_pid}/fd")}
    vmm_client, vmm = start_forever(assemble, socket_path)
    try:
        assert len(os.listdir(f"/proc/{vmm}/task")) >= 2  # main + vCPU: threads start after the fork
        targets = {int(fd): os.readlink(f"/proc/{vmm}/fd/{fd}") for fd in os.listdir(f"/proc/{vmm}/fd")}
        sockets = [target for target in targets.values() if target.startswith("socket:")]
        assert sockets == []  # not even its connection: only the launcher holds that
        listener = {t for t in server_sockets if t.startswith("socket:")} - set(sockets)
        assert not listener & set(targets.values())  # not the launcher's listening socket
        assert not any(t.endswith(".lock") or t.endswith(".pid") for t in targets.values())
        # Its stdio is the client's (pipes), not the launcher's.
        client_out = os.readlink(f"/proc/{vmm_client.pid}/fd/1")
        assert targets[1] == client_out
    finally:
        vmm_client.send_signal(signal.SIGINT)  # relayed: the VMM stops in order
        vmm_client.wait(timeout=60)
    assert wait_gone(vmm)
    assert vmm_client.returncode == 130


def test_a_killed_client_takes_its_vmm_with_it(assemble, launcher, socket_path):
    vmm_client, vmm = start_forever(assemble, socket_path)
    vmm_client.kill()
    vmm_client.wait()
    assert wait_gone(vmm), "the VMM outlived its client"
    assert launcher.poll() is None


def test_a_killed_launcher_ends_the_command_and_its_vmm(assemble, launcher, socket_path):
    vmm_client, vmm = start_forever(assemble, socket_path)
    launcher.kill()
    launcher.wait()
    _, err = vmm_client.communicate(timeout=60)
    assert vmm_client.returncode == 1 and b"launcher went away" in err
    assert wait_gone(vmm)


def test_vmctl_up_forks_its_vmm_daemon_from_the_launcher(assemble, launcher, socket_path, tmp_path, vmctl_cli,
                                                         monkeypatch):
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("VMCTL_LAUNCHER", socket_path)
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  idle:\n    kernel: {assemble('forever.S')}\n    memory: 64M\n")
    assert vmctl_cli("up", str(spec), "idle", "--no-wait").returncode == 0
    record = json.loads((tmp_path / "state" / "machines" / "idle" / "machine.json").read_text())
    vmm = record["pid"]
    try:
        assert vmm in children(launcher.pid)  # forked by the launcher, not a new interpreter
        assert os.getsid(vmm) == vmm  # detached: its own session
        assert vmctl_cli("down", "idle").returncode == 0
        assert wait_gone(vmm)  # and the launcher reaped it (no zombie left)
        assert vmctl_cli("rm", "idle").returncode == 0
    finally:
        if pid_alive(vmm):
            os.kill(vmm, signal.SIGKILL)
