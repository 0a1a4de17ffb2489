"""The VMM sandbox (vmm/sandbox.py) with a real Linux guest: a busybox machine on
`network: nat` with a qcow2 data disk, its VMM as `nobody` under the seccomp filter, goes
through exec (guest agent), disk I/O, network traffic to the host, a graceful `vmctl down`
and `rm`; nothing of its network stays behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vmctl.images import locate
from vmctl.vmm.sandbox import available

VMCTL = str(Path(sys.executable).with_name("vmctl"))


def vmctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([VMCTL, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def sandboxed(monkeypatch):
    if available() is not None:
        pytest.skip(str(available()))
    if not locate("busybox").initramfs.exists():
        pytest.skip("the reference images are not built (vmctl image build)")
    state = tempfile.mkdtemp(prefix="vmctl-sandbox-")  # reachable by nobody, so the VMM drops
    os.chmod(state, 0o755)
    monkeypatch.setenv("VMCTL_STATE_DIR", state)
    monkeypatch.setenv("VMCTL_SANDBOX", "1")
    yield Path(state)
    shutil.rmtree(state, ignore_errors=True)


def test_linux_guest_under_the_sandbox_with_network_and_disk(sandboxed, tmp_path):
    spec = tmp_path / "vm.yaml"
    spec.write_text("machines:\n  boxed:\n    memory: 256M\n    network: nat\n"
                    "    disks:\n      - size: 64M\n")
    up = vmctl("up", str(spec))
    folder = sandboxed / "machines" / "boxed"
    try:
        assert up.returncode == 0, up.stderr + _log(folder)
        report = json.loads((folder / "sandbox.json").read_text())
        assert report["seccomp"] == "filter" and report["user"] == "nobody", report
        assert report["no_new_privs"] and any("guard process" in n for n in report["notes"]), report
        network = json.loads((folder / "network.json").read_text())
        script = ("dd if=/dev/urandom of=/tmp/r bs=64k count=64 2>/dev/null && "
                  "dd if=/tmp/r of=/dev/vda bs=64k 2>/dev/null && sync && echo 3 >/proc/sys/vm/drop_caches && "
                  "md5sum </tmp/r | cut -c1-32 && dd if=/dev/vda bs=64k count=64 2>/dev/null | md5sum | cut -c1-32"
                  f" && ping -c 3 -W 5 {network['host_ip']} >/dev/null && echo ping-ok")
        run = vmctl("exec", "boxed", "--", "sh", "-c", script)
        assert run.returncode == 0, run.stderr + _log(folder)
        written, read_back, ping = run.stdout.split()
        assert written == read_back and ping == "ping-ok", run.stdout
        status = json.loads(vmctl("status", "boxed").stdout)
        assert status["state"] == "running" and status["sandbox"]["seccomp"] == "filter", status
        down = vmctl("down", "boxed")
        assert down.returncode == 0, down.stderr + _log(folder)
        status = json.loads(vmctl("status", "boxed").stdout)
        assert status["state"] == "exited", (status, _log(folder))
        rules = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True).stdout
        assert f"vmctl:{network['tap']}" not in rules
        assert not os.path.exists(f"/sys/class/net/{network['tap']}")
    finally:
        vmctl("rm", "boxed")


def _log(folder: Path) -> str:
    """vmm.log and the kernel's seccomp audit lines: which call killed the VMM, if one did."""
    text = ""
    try:
        text += (folder / "vmm.log").read_text()[-3000:]
    except OSError:
        pass
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    return text + "\n".join(line for line in dmesg.splitlines() if "type=1326" in line or "seccomp" in line)
