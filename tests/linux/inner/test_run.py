"""Real Linux guests through the lifecycle CLI and the pytest plugin (three boots in all).

- `vmctl run -- uname -a` (busybox initramfs): output, status, nothing left behind.
- `vmctl up` / `exec` (guest agent on COM2, no network) / `console` / `down` (guest shutdown) / `rm`.
- the `vmctl_session_guest` fixture on the debian image with a network: commands over SSH,
  files in and out.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmctl.images import locate

VMCTL = str(Path(sys.executable).with_name("vmctl"))


@pytest.fixture(scope="module", autouse=True)
def state_dir(tmp_path_factory) -> Path:
    # Unix sockets live in the state folder: it must be a local file system (not 9p).
    path = tmp_path_factory.mktemp("state")
    previous = os.environ.get("VMCTL_STATE_DIR")
    os.environ["VMCTL_STATE_DIR"] = str(path)
    yield path
    if previous is None:
        del os.environ["VMCTL_STATE_DIR"]
    else:
        os.environ["VMCTL_STATE_DIR"] = previous


def vmctl(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([VMCTL, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def leftovers(state: Path) -> list[str]:
    machines = state / "machines"
    return sorted(p.name for p in machines.iterdir() if p.name != ".lock") if machines.exists() else []


def test_run_uname(state_dir):
    if not locate("busybox").initramfs.exists():
        pytest.skip("the reference images are not built (vmctl image build)")
    result = vmctl("run", "--", "uname", "-a")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Linux run-") and "x86_64" in result.stdout
    assert not result.stdout.startswith("Linux run-run-")  # the generated name says "run" once
    assert result.stdout.count("\n") == 1  # only the command's output, no boot log
    assert leftovers(state_dir) == []


def test_up_exec_console_down_rm_through_the_agent(state_dir, tmp_path):
    if not locate("busybox").initramfs.exists():
        pytest.skip("the reference images are not built (vmctl image build)")
    spec = tmp_path / "vm.yaml"
    spec.write_text("machines:\n  box:\n    memory: 128M\n    environment: {GREETING: hello there}\n")
    up = vmctl("up", str(spec))
    assert up.returncode == 0, up.stderr
    assert "box: ready in" in up.stderr
    try:
        run = vmctl("exec", "box", "--", "sh", "-c", 'echo "$GREETING"; echo oops >&2; exit 7')
        assert (run.returncode, run.stdout, run.stderr) == (7, "hello there\n", "oops\n")

        # Type a command on the serial console, read its output, detach with Ctrl-A x.
        console = subprocess.Popen([VMCTL, "console", "box"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        console.stdin.write(b"echo console-$((6*7))\n")
        console.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 60
        while b"console-42" not in seen:
            ready, _, _ = select.select([console.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no console-42 on the console within 60 s: {seen!r}"
            chunk = console.stdout.read1(4096)
            assert chunk, f"console ended early: {seen!r}"
            seen += chunk
        console.stdin.write(b"\x01x")
        console.stdin.close()
        assert console.wait(timeout=30) == 0
        assert b"detached" in console.stderr.read()

        down = vmctl("down", "box", "--timeout", "60")
        assert down.returncode == 0, down.stderr
        row = json.loads(vmctl("ps", "--json").stdout)[0]
        assert row["state"] == "exited" and row["detail"].startswith("shut down by vmctl down"), row
        assert "console-42" in vmctl("logs", "box").stdout
    finally:
        assert vmctl("rm", "box").returncode == 0
    assert leftovers(state_dir) == []


def test_session_guest_over_ssh(vmctl_session_guest):
    if not locate("debian").rootfs_qcow2.exists():
        pytest.skip("the debian image is not built (vmctl image rootfs --profile debian)")
    vm = vmctl_session_guest({"image": "debian", "memory": "512M", "network": "isolated",
                              "environment": {"ROLE": "test"}})
    code, out, err = vm.exec('echo "$ROLE via ${SSH_CONNECTION%% *}"; python3 -c "import sys; print(sys.version_info[0])"')
    assert (code, err) == (0, ""), err
    role, major = out.splitlines()
    assert role.startswith("test via 172.30.") and major == "3"  # SSH_CONNECTION: the host's TAP address
    assert vm.exec("exit 3")[0] == 3
    payload = os.urandom(30_000)  # two chunks
    vm.put(payload, "/root/blob")
    assert vm.get("/root/blob") == payload
    assert "VMCTL-READY" in vm.console_log
    if shutil.which("ssh"):
        ssh = vmctl("ssh", vm.name, "--", "hostname")
        assert ssh.returncode == 0 and ssh.stdout.strip() == vm.name, ssh.stderr
