"""Lifecycle of tiny guests through the real CLI: up / ps / logs / down / rm, and kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest


@pytest.fixture
def spec(tmp_path, assemble, monkeypatch):
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "vm.yaml"
    path.write_text(
        f"machines:\n"
        f"  hello:\n    kernel: {assemble('hello.S', STATUS=0)}\n"
        f"  idle:\n    kernel: {assemble('forever.S')}\n    cpus: 2\n    memory: 64M\n"
    )
    return path


def ps(vmctl_cli) -> dict:
    result = vmctl_cli("ps", "--json")
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_up_ps_logs_down_rm(spec, vmctl_cli, tmp_path):
    assert vmctl_cli("up", str(spec), "hello").returncode == 0
    assert vmctl_cli("up", str(spec), "idle", "--no-wait").returncode == 0
    rows = ps(vmctl_cli)
    assert rows["hello"]["state"] == "exited" and rows["hello"]["exit_code"] == 0
    assert rows["idle"]["state"] == "running" and rows["idle"]["cpus"] == 2
    assert vmctl_cli("logs", "hello").stdout == "hello from the guest\n"
    again = vmctl_cli("up", str(spec), "idle", "--no-wait")
    assert again.returncode == 0 and "already running" in again.stderr
    assert vmctl_cli("down", "idle").returncode == 0
    assert ps(vmctl_cli)["idle"]["state"] == "exited"
    assert vmctl_cli("rm", "hello", "idle").returncode == 0
    assert ps(vmctl_cli) == {}
    assert sorted(os.listdir(tmp_path / "state" / "machines")) == [".lock"]


def test_kill_9_of_a_vmm_is_shown_dead_and_rm_leaves_nothing(spec, vmctl_cli, tmp_path):
    assert vmctl_cli("up", str(spec), "idle", "--no-wait").returncode == 0
    pid = ps(vmctl_cli)["idle"]["pid"]
    deadline = time.monotonic() + 30
    while not (tmp_path / "state/machines/idle/control.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while ps(vmctl_cli)["idle"]["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ps(vmctl_cli)["idle"]["state"] == "dead"
    assert vmctl_cli("rm", "idle").returncode == 0
    assert not (tmp_path / "state/machines/idle").exists()
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"


def _network_tools() -> None:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing: no TAP devices here")
    if shutil.which("iptables") is None or shutil.which("ip") is None:
        pytest.skip("iptables and ip (iproute2) are needed for nat networking")


def _nat_rules() -> str:
    return subprocess.run(["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"], capture_output=True, text=True).stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_kill_9_of_a_wired_vmm_then_rm_leaves_no_tap_rule_port_file_or_process(assemble, vmctl_cli, tmp_path, monkeypatch):
    _network_tools()
    state = tmp_path / "state"
    monkeypatch.setenv("VMCTL_STATE_DIR", str(state))
    port = _free_port()
    spec = tmp_path / "wired.yaml"
    spec.write_text(f"machines:\n  wired:\n    kernel: {assemble('forever.S')}\n    memory: 32M\n"
                    f"    disks: [{{size: 16M}}]\n    network: {{mode: nat, forwards: ['{port}:80']}}\n")
    assert vmctl_cli("up", str(spec), "--no-wait").returncode == 0
    folder = state / "machines" / "wired"
    deadline = time.monotonic() + 30
    while not (folder / "control.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    row = ps(vmctl_cli)["wired"]
    tap, pid = row["network"]["tap"], row["pid"]
    assert row["state"] == "running" and os.path.exists(f"/sys/class/net/{tap}")
    assert f"vmctl:{tap}" in _nat_rules()
    assert (folder / "disks" / "disk0.qcow2").exists() and (folder / "ssh" / "id_ed25519").exists()
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the VMM relays the forwarded port

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while ps(vmctl_cli)["wired"]["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ps(vmctl_cli)["wired"]["state"] == "dead"
    assert not os.path.exists(f"/sys/class/net/{tap}")  # a TAP goes with its last fd
    result = vmctl_cli("rm", "wired")
    assert result.returncode == 0, result.stderr
    assert f"vmctl:{tap}" not in _nat_rules()
    assert not folder.exists() and sorted(os.listdir(state / "machines")) == [".lock"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert str(state) not in open("/proc/mounts").read()
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"


def test_a_vmm_that_cannot_start_says_why_and_rm_leaves_nothing(assemble, vmctl_cli, tmp_path, monkeypatch):
    _network_tools()
    state = tmp_path / "state"
    monkeypatch.setenv("VMCTL_STATE_DIR", str(state))
    taps_before = set(os.listdir("/sys/class/net"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        spec = tmp_path / "busy.yaml"
        spec.write_text(f"machines:\n  busy:\n    kernel: {assemble('forever.S')}\n    memory: 32M\n"
                        f"    network: {{mode: isolated, forwards: ['{port}:22']}}\n")
        result = vmctl_cli("up", str(spec))
    # a taken port is found before anything starts: one line naming the spec line, nothing made
    assert result.returncode == 1
    assert result.stderr == f"vmctl: error: {spec}:3: network.forwards: host port {port}/tcp is taken (0:22 picks a free one)\n"
    assert ps(vmctl_cli) == {}
    assert sorted(os.listdir(state / "machines")) == [".lock"]
    assert set(os.listdir("/sys/class/net")) - taps_before == set()


def test_unknown_machine_and_bad_spec_are_one_line_errors(spec, vmctl_cli, tmp_path):
    result = vmctl_cli("status", "nope")
    assert result.returncode == 1 and result.stderr == "vmctl: error: no machine named 'nope' (machines: none)\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("machines:\n  a:\n    cpu: 1\n")
    result = vmctl_cli("up", str(bad))
    assert result.returncode == 1
    assert result.stderr == f"vmctl: error: {bad}:3:5: machines.a.cpu: unknown key (did you mean 'cpus'?)\n"


def test_run_returns_the_guest_status_and_leaves_no_state(assemble, vmctl_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    result = vmctl_cli("run", "--kernel", str(assemble("hello.S", STATUS=9)), "--show-boot", "--", "true")
    assert result.returncode == 9, result.stderr
    assert result.stdout == "hello from the guest\n"
    assert sorted(os.listdir(tmp_path / "state" / "machines")) == [".lock"]
    crashed = vmctl_cli("run", "--kernel", str(assemble("crash.S")), "--", "true")
    assert crashed.returncode == 1 and "triple fault" in crashed.stderr
    assert sorted(os.listdir(tmp_path / "state" / "machines")) == [".lock"]
