"""The VMM sandbox (vmm/sandbox.py): after every fd is open, the VMM runs as `nobody` with
no_new_privs and a seccomp allow-list; a system call outside it kills the process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

from vmctl.vmm.sandbox import allowed, available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

CHILD = textwrap.dedent("""
    import io, json, os, sys
    from pathlib import Path
    from vmctl.vmm.machine import Machine, MachineConfig
    from vmctl.vmm import sandbox
    console = io.BytesIO()
    states = []
    def enter():
        states.append(sandbox.enter("nobody", []))
    machine = Machine(MachineConfig(kernel=Path(sys.argv[1]), cpus=2, memory=64 << 20,
                                    console_sinks=[console], timeout=60, before_start=enter))
    outcome = machine.run()
    print(json.dumps({"exit": outcome.exit_code, "console": console.getvalue().decode(),
                      "sandbox": states[0].as_dict()}), flush=True)
    if sys.argv[2] == "exec":
        os.execv("/bin/true", ["true"])
    elif sys.argv[2] == "setuid":
        os.setuid(0)
    elif sys.argv[2] == "mount":
        import ctypes
        ctypes.CDLL(None, use_errno=True).mount(b"none", b"/tmp", b"tmpfs", 0, None)
    print("still alive", flush=True)
""")


def run_child(kernel, then: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(kernel), then], capture_output=True,
                          text=True, timeout=120)


def test_sandboxed_vmm_runs_a_guest(assemble):
    done = run_child(assemble("hello.S", STATUS=0), "nothing")
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    report = json.loads(first)
    assert report["exit"] == 0 and report["console"] == "hello from the guest\n"
    assert report["sandbox"]["user"] == "nobody" and report["sandbox"]["no_new_privs"]
    assert report["sandbox"]["seccomp"] == "filter"
    assert report["sandbox"]["allowed_syscalls"] == len(allowed())
    assert second == "still alive"


@pytest.mark.parametrize("forbidden", ["exec", "setuid", "mount"])
def test_a_forbidden_system_call_kills_the_vmm(assemble, forbidden):
    done = run_child(assemble("hello.S", STATUS=0), forbidden)
    assert done.returncode == -signal.SIGSYS, (done.returncode, done.stderr)
    assert "still alive" not in done.stdout


def test_daemon_in_the_sandbox_reports_it_in_status(assemble, vmctl_cli, tmp_path, monkeypatch):
    state = tempfile.mkdtemp(prefix="vmctl-sandbox-")  # pytest's tmp_path is 0700: nobody
    os.chmod(state, 0o755)  # could not write the outcome there
    monkeypatch.setenv("VMCTL_STATE_DIR", state)
    monkeypatch.setenv("VMCTL_SANDBOX", "1")
    spec = tmp_path / "s.yaml"
    spec.write_text(f"machines:\n  boxed:\n    kernel: {assemble('hello.S', STATUS=0)}\n"
                    "    memory: 32M\n")  # no network: the VMM can also drop to nobody
    up = vmctl_cli("up", str(spec))
    try:
        assert up.returncode == 0, up.stderr
        status = json.loads(vmctl_cli("status", "boxed").stdout)
        assert status["state"] == "exited" and status["exit_code"] == 0, status
        assert status["sandbox"]["seccomp"] == "filter" and status["sandbox"]["user"] == "nobody"
    finally:
        vmctl_cli("rm", "boxed")
        shutil.rmtree(state, ignore_errors=True)
    check = vmctl_cli("host-check")
    assert "vmm sandbox" in check.stdout and "available" in check.stdout
