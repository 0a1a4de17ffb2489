"""The CLI under SIGINT, SIGTERM, SIGHUP and a closed stdout, at several points, and its
stdin rules: no traceback ever, and nothing left behind (state folder, mounts, processes,
cgroups, TAPs).

Containers (real crun/runc) and tiny guests on the native VMM: both start in well under a
second, so each signal can be sent while the machine is being made and while it runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmctl.errors import VmctlError

VMCTL = shutil.which("vmctl", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


def _container_skip() -> str | None:
    if os.geteuid() != 0:
        return "containers need root"
    from vmctl.backends.container.runtime import choose
    from vmctl.images import locate

    try:
        choose()
    except VmctlError as error:
        return str(error)
    if not (locate("busybox").rootfs_tree / "bin").is_dir():
        return "the busybox base tree is not built (vmctl image build)"
    return None


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("VMCTL_STATE_DIR", str(path))
    return path


@pytest.fixture
def containers(tmp_path, state) -> Path:
    reason = _container_skip()
    if reason:
        pytest.skip(reason)
    spec = tmp_path / "c.yaml"
    spec.write_text("defaults:\n  backend: container\nmachines:\n  job: {}\n  idle:\n    network: isolated\n")
    return spec


def traces(state: Path, tmp_path: Path) -> list[str]:
    """Everything a machine could leave behind."""
    found = [f"state: {p.name}" for p in (state / "machines").glob("*") if p.name != ".lock"]
    found += [line for line in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in line]
    processes = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    found += [line for line in processes if str(state) in line and "ps -eo" not in line]
    found += [str(p) for p in Path("/sys/fs/cgroup").glob("*/vmctl/vmctl-job-*")]
    found += [str(p) for p in Path("/sys/fs/cgroup").glob("vmctl/vmctl-job-*")]
    return found


def _wait_gone(state: Path, tmp_path: Path, seconds: float = 10) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := traces(state, tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _interrupt(argv: list[str], sig: int, when: str, marker: bytes = b"started") -> subprocess.CompletedProcess:
    """Start `vmctl argv`, send `sig` once `when` is reached: "early" (0.3 s in: the machine
    is being made) or "running" (the command printed `marker`)."""
    process = subprocess.Popen([VMCTL, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    out = b""
    try:
        if when == "early":
            time.sleep(0.3)
        else:
            deadline = time.monotonic() + 60
            while marker not in out and time.monotonic() < deadline and process.poll() is None:
                out += process.stdout.read1(4096)
        process.send_signal(sig)
        rest, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(argv, process.returncode, out + rest, err)


@pytest.mark.parametrize("when", ["early", "running"])
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_run_of_a_container_cleans_up_on_every_signal(containers, state, tmp_path, sig, when):
    result = _interrupt(["run", str(containers), "--name", "job", "--", "sh", "-c", "echo started; sleep 60"],
                        sig, when)
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr, stderr
    assert result.returncode in (128 + sig, 1), stderr  # 1: the signal hit the start, reported as its error
    assert _wait_gone(state, tmp_path) == []


def test_run_with_a_closed_stdout_cleans_up(containers, state, tmp_path):
    process = subprocess.Popen([VMCTL, "run", str(containers), "--name", "job", "--", "sh", "-c",
                                "while :; do echo line; sleep 0.1; done"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"line\n"
        process.stdout.close()  # like `vmctl run … | head -1`
        stderr = process.stderr.read().decode()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert process.returncode == 128 + signal.SIGPIPE
    assert _wait_gone(state, tmp_path) == []


def test_stdin_is_empty_unless_asked_for(containers, state, tmp_path):
    """`docker run`'s rule: without -i the command reads EOF at once; -i gives it our stdin."""
    plain = subprocess.run([VMCTL, "run", str(containers), "--name", "job", "--", "cat"], input=b"x\n",
                           capture_output=True, timeout=60)
    assert (plain.returncode, plain.stdout) == (0, b""), plain.stderr
    given = subprocess.run([VMCTL, "run", "-i", str(containers), "--name", "job", "--", "tr", "a-z", "A-Z"],
                           input=b"hello\n", capture_output=True, timeout=60)
    assert (given.returncode, given.stdout) == (0, b"HELLO\n"), given.stderr
    assert subprocess.run([VMCTL, "up", str(containers), "idle"], capture_output=True, timeout=60).returncode == 0
    try:
        plain = subprocess.run([VMCTL, "exec", "idle", "--", "cat"], input=b"x\n", capture_output=True, timeout=60)
        assert (plain.returncode, plain.stdout) == (0, b"")
        given = subprocess.run([VMCTL, "exec", "-i", "idle", "--", "wc", "-c"], input=b"x" * 100000,
                               capture_output=True, timeout=60)
        assert (given.returncode, given.stdout.strip()) == (0, b"100000"), given.stderr
    finally:
        subprocess.run([VMCTL, "rm", "idle"], capture_output=True, timeout=60)
    assert _wait_gone(state, tmp_path) == []


@pytest.fixture
def tiny(tmp_path, state, assemble) -> Path:
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  idle:\n    kernel: {assemble('forever.S')}\n    memory: 64M\n"
                    f"    network: isolated\n")
    return spec


def _taps() -> set[str]:
    return set(re.findall(r"\d+: (vmctl\d+)[@:]", subprocess.run(["ip", "-o", "link"], capture_output=True,
                                                                 text=True).stdout))


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_run_of_a_vm_removes_the_vmm_and_its_tap_on_every_signal(tiny, state, tmp_path, sig):
    before = _taps()
    result = _interrupt(["run", str(tiny), "--name", "idle", "--", "true"], sig, "early")
    assert "Traceback" not in result.stderr.decode(), result.stderr.decode()
    assert result.returncode in (128 + sig, 1)
    assert _wait_gone(state, tmp_path) == []
    assert _taps() <= before


def test_ctrl_c_during_up_says_what_keeps_running(tiny, state, tmp_path):
    process = subprocess.Popen([VMCTL, "up", str(tiny)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (state / "machines/idle/machine.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # waiting for a readiness this guest never reports
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 130 and "Traceback" not in stderr, stderr
        assert "idle keeps running in the background" in stderr and "vmctl down idle" in stderr
        ps = subprocess.run([VMCTL, "ps"], capture_output=True, text=True).stdout
        assert re.search(r"^idle\s+kvm\s+running", ps, re.M), ps
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        subprocess.run([VMCTL, "rm", "idle"], capture_output=True, timeout=60)
    assert _wait_gone(state, tmp_path) == []
