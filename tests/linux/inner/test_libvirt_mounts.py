"""`mounts:` through libvirt in a real Linux guest (one boot): QEMU's virtio-9p under libvirt
(`<filesystem type="mount" accessmode="passthrough">`), mounted by vmctl's /init in the
busybox guest (reference kernel, direct kernel boot). The guest reads the host's file and
writes its own, the host's later change shows at once (9p's default, cache=none), and the
read-only mount refuses writes.

Inside the nested host no libvirtd runs: the module fixture starts one, as test_libvirt.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmctl.images import locate

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (scripts/libvirt-setup)")

VMCTL = str(Path(sys.executable).with_name("vmctl"))


@pytest.fixture(scope="module", autouse=True)
def kernel_with_9p() -> None:
    images = locate("busybox")
    if images.kernel_config.exists() and "CONFIG_9P_FS=y" not in images.kernel_config.read_text():
        pytest.skip("the reference kernel has no 9p (rebuild: vmctl image build)")


@pytest.fixture
def state_dir(tmp_path, monkeypatch, libvirtd) -> Path:
    path = tmp_path / "state"  # console log and agent socket: a local file system
    monkeypatch.setenv("VMCTL_STATE_DIR", str(path))
    yield path
    conn = libvirt.open(libvirtd)
    try:
        assert [d.name() for d in conn.listAllDomains(0) if d.name().startswith("vmctl-lv9p")] == []
    finally:
        conn.close()


def vmctl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([VMCTL, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_busybox_guest_reads_and_writes_host_folders_over_9p(state_dir, tmp_path):
    shared, readonly = tmp_path / "shared", tmp_path / "readonly"
    for folder in (shared, readonly):
        folder.mkdir()  # QEMU runs as our uid (vmctl's <seclabel>): no relabelling, no chmod
    (shared / "hello").write_text("from the host\n")
    (readonly / "keep").write_text("do not touch\n")
    spec = tmp_path / "vm.yaml"
    spec.write_text("machines:\n  lv9p:\n    backend: libvirt\n    memory: 256M\n"
                    f"    mounts:\n      - {{host: {shared}, guest: /mnt/shared}}\n"
                    f"      - {{host: {readonly}, guest: /mnt/ro, read_only: true}}\n"
                    "    command: [sh, -c, 'while [ ! -e /tmp/go ]; do sleep 0.2; done']\n")
    up = vmctl("up", str(spec))
    assert up.returncode == 0, up.stderr

    def guest(script: str) -> subprocess.CompletedProcess:
        return vmctl("exec", "lv9p", "--", "sh", "-c", script)

    try:
        mounts = guest("grep -E ' /mnt/(shared|ro) ' /proc/mounts | cut -d' ' -f2,3,4 | cut -d, -f1")
        assert (mounts.returncode, sorted(mounts.stdout.splitlines())) == (0, ["/mnt/ro 9p ro", "/mnt/shared 9p rw"]), \
            mounts.stderr + vmctl("logs", "lv9p").stdout[-3000:]
        run = guest("cat /mnt/shared/hello; echo from the guest > /mnt/shared/back; mkdir /mnt/shared/d; "
                    "echo deeper > /mnt/shared/d/f")
        assert (run.returncode, run.stdout) == (0, "from the host\n"), run.stderr
        assert (shared / "back").read_text() == "from the guest\n" and (shared / "d" / "f").read_text() == "deeper\n"
        (shared / "hello").write_text("changed on the host, longer\n")  # 9p cache=none: seen at once
        (shared / "late").write_text("new\n")
        run = guest("cat /mnt/shared/hello /mnt/shared/late; ls /mnt/shared | tr '\\n' ' '")
        assert (run.returncode, run.stdout) == (0, "changed on the host, longer\nnew\nback d hello late "), run.stderr
        run = guest("cat /mnt/ro/keep; echo x > /mnt/ro/keep")
        assert run.returncode != 0 and run.stdout == "do not touch\n" and "Read-only" in run.stderr, run
        assert (readonly / "keep").read_text() == "do not touch\n"
        row = json.loads(vmctl("ps", "--json").stdout)[0]
        assert (row["backend"], row["state"]) == ("libvirt", "running")
        guest("touch /tmp/go")
    finally:
        assert vmctl("rm", "lv9p").returncode == 0
