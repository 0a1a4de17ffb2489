"""What the CLI says is true and names the next step (containers: fast, real crun/runc).

Each test here failed before its fix: `down` said "stopped" for a machine it killed or that
had already exited, `exec` into a stopped machine gave no next step, `console`/`ssh` on a
container said "not running" / "give it network: isolated", `ps` misaligned long names,
`exec --timeout` left the command running, a `vmctl up` killed after the monitor's report
left `ps` saying "dead", `ps --json | head -1` printed a BrokenPipeError traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from vmctl.errors import VmctlError
from vmctl.state import pid_alive


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "containers need root (overlay mounts, cgroups, veths)"
    from vmctl.backends.container.runtime import choose
    from vmctl.images import locate

    try:
        choose()
    except VmctlError as error:
        return str(error)
    if not (locate("busybox").rootfs_tree / "bin").is_dir():
        return "the busybox base tree is not built (vmctl image build)"
    return None


SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

LONG = "a-machine-with-a-rather-long-name"


@pytest.fixture
def spec(tmp_path, monkeypatch):
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "c.yaml"
    path.write_text(
        "defaults:\n  backend: container\n"
        "machines:\n"
        "  idle:\n    network: isolated\n"
        "  stubborn:\n    command: \"trap '' TERM; while :; do sleep 1; done\"\n"
        "  brief:\n    command: \"true\"\n"
        f"  {LONG}: {{}}\n"
    )
    return path


def test_down_says_stopped_killed_or_not_running(spec, vmctl_cli):
    assert vmctl_cli("up", str(spec), "idle", "stubborn", "brief").returncode == 0
    try:
        time.sleep(0.5)  # `brief` has exited by now
        down = vmctl_cli("down", "idle", "stubborn", "brief", "--timeout", "1")
        assert down.returncode == 0, down.stderr
        lines = dict(line.split(": ", 1) for line in down.stderr.splitlines() if ": " in line)
        assert lines["idle"].startswith("stopped")
        assert lines["stubborn"].startswith("forced to stop after 1 s") and "SIGKILL" in lines["stubborn"]
        assert lines["brief"].startswith("was not running (exited with status 0")
    finally:
        vmctl_cli("rm", "idle", "stubborn", "brief")


def test_exec_into_a_stopped_machine_names_the_next_step(spec, vmctl_cli):
    assert vmctl_cli("up", str(spec), "brief").returncode == 0
    try:
        time.sleep(0.5)
        result = vmctl_cli("exec", "brief", "--", "true")
        assert result.returncode == 1
        assert "brief: not running (exited" in result.stderr
        assert f"vmctl rm brief && vmctl up {spec} brief" in result.stderr and "vmctl logs brief" in result.stderr
    finally:
        vmctl_cli("rm", "brief")


def test_console_ssh_and_exec_timeout_on_a_running_container(spec, vmctl_cli):
    assert vmctl_cli("up", str(spec), "idle").returncode == 0
    try:
        console = vmctl_cli("console", "idle")
        assert console.returncode == 1 and "no serial console" in console.stderr and "vmctl exec idle" in console.stderr
        ssh = vmctl_cli("ssh", "idle")
        assert ssh.returncode == 1 and "runs no sshd" in ssh.stderr and "network: isolated" not in ssh.stderr
        timed = vmctl_cli("exec", "--timeout", "2", "idle", "--", "sleep", "4321")
        assert timed.returncode == 1 and "did not finish in 2 s" in timed.stderr
        time.sleep(0.5)
        processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert "sleep 4321" not in processes  # killed in the container, not only the runtime's client
    finally:
        vmctl_cli("rm", "idle")


def test_ps_keeps_its_columns_with_long_names_and_survives_a_closed_pipe(spec, vmctl_cli, tmp_path):
    assert vmctl_cli("up", str(spec), LONG, "idle").returncode == 0
    try:
        table = vmctl_cli("ps").stdout.splitlines()
        starts = {line.index("container") for line in table[1:]}
        assert len(starts) == 1 and table[0].index("BACKEND") == starts.pop()
        for command in ("ps --json | head -1", "status idle | head -2", "ps | head -1"):
            exe = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin/vmctl"
            exe = exe if exe.exists() else Path(__import__("sys").executable).with_name("vmctl")
            result = subprocess.run(["/bin/bash", "-c", f"set -o pipefail; {exe} {command}"], capture_output=True,
                                    text=True, env=os.environ)
            assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
            assert result.stdout.count("\n") <= 2
    finally:
        vmctl_cli("rm", LONG, "idle")


def test_ps_tells_the_truth_after_up_was_killed_before_saving_the_record(spec, vmctl_cli, tmp_path):
    """`vmctl up` killed (-9) after the monitor reported but before the record got the pids."""
    assert vmctl_cli("up", str(spec), "idle").returncode == 0
    folder = tmp_path / "state/machines/idle"
    record = json.loads((folder / "machine.json").read_text())
    init_pid, monitor_pid = record["pid"], record["plan"]["monitor_pid"]
    record["pid"] = None
    record["plan"]["monitor_pid"] = None
    (folder / "machine.json").write_text(json.dumps(record))
    try:
        row = {r["name"]: r for r in json.loads(vmctl_cli("ps", "--json").stdout)}["idle"]
        assert (row["state"], row["pid"]) == ("running", init_pid)
    finally:
        assert vmctl_cli("rm", "idle").returncode == 0
    time.sleep(0.2)
    assert not pid_alive(init_pid) and not pid_alive(monitor_pid)  # (a zombie waiting for its reaper is gone)
    assert [line for line in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in line] == []


def test_up_with_a_linux_vm_this_host_cannot_boot_starts_nothing_and_says_what_can(tmp_path, vmctl_cli, monkeypatch):
    from vmctl.kvm.system import KvmFlavour

    if KvmFlavour.detect().module != "kvm_pvm":
        pytest.skip("only a paravirtual /dev/kvm (kvm_pvm) refuses Linux guests")
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    spec = tmp_path / "mixed.yaml"
    spec.write_text("machines:\n  box:\n    backend: container\n  vm:\n    memory: 128M\n")
    started = time.monotonic()
    result = vmctl_cli("up", str(spec))
    assert result.returncode == 1 and time.monotonic() - started < 30
    assert "vm: this host's /dev/kvm is paravirtual (kvm_pvm)" in result.stderr
    assert f"vmctl up {spec} box" in result.stderr and "vmctl run --nested" in result.stderr
    assert json.loads(vmctl_cli("ps", "--json").stdout) == []  # nothing was started


def test_up_of_a_local_libvirt_kvm_linux_guest_on_a_paravirtual_kvm_is_refused_before_anything(tmp_path, vmctl_cli,
                                                                                                monkeypatch):
    from vmctl.kvm.system import KvmFlavour

    if KvmFlavour.detect().module != "kvm_pvm":
        pytest.skip("only a paravirtual /dev/kvm (kvm_pvm) refuses Linux guests")
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    spec = tmp_path / "lv.yaml"
    spec.write_text("machines:\n  lv:\n    backend: libvirt\n    memory: 128M\n")
    result = vmctl_cli("up", str(spec))
    assert result.returncode == 1
    assert "lv: backend libvirt (qemu:///system, domain type kvm): this host's /dev/kvm is paravirtual" in result.stderr
    assert json.loads(vmctl_cli("ps", "--json").stdout) == []
