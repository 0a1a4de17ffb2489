"""Host folders in real Linux guests over vmctl's virtio-fs (two boots in all): each guest reads
and writes a mount, a read-only mount refuses writes, and two guests plus the host share one
folder and see each other's writes."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from vmctl.guest_contract import XFER_GUEST
from vmctl.images import locate
from vmctl.testing import guest


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "state"  # sockets: a local file system
    monkeypatch.setenv("VMCTL_STATE_DIR", str(path))
    return path


def check(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert code == 0, err
    return out


def eventually(vm, command: str, expected: str, timeout: float = 10) -> None:
    """Names and attributes are cached for 1 s: another client's change shows within that."""
    deadline = time.monotonic() + timeout
    while True:
        out = vm.exec(command)[1]
        if out == expected or time.monotonic() > deadline:
            assert out == expected
            return
        time.sleep(0.5)


def images_share_folders() -> str | None:
    """Why the built images cannot mount shares (None: they can)."""
    images = locate("busybox")
    if not images.initramfs.exists():
        return "the reference images are not built (vmctl image build)"
    if "CONFIG_VIRTIO_FS=y" not in images.kernel_config.read_text():
        return "the reference kernel has no virtio-fs (rebuild: vmctl image build)"
    return None


def test_two_guests_and_the_host_share_a_folder(tmp_path):
    if reason := images_share_folders():
        pytest.skip(reason)
    shared, readonly = tmp_path / "shared", tmp_path / "readonly"
    shared.mkdir()
    readonly.mkdir()
    (shared / "from-host.txt").write_text("host says hi\n")
    (readonly / "keep.txt").write_text("do not touch\n")
    # /shared and b's mount: the default `cache: auto` (others' changes within ~1 s: `eventually`);
    # /strict, the same folder with `cache: never`: every change is seen at the next call
    spec_a = {"name": "fs-a", "memory": "128M",
              "mounts": [{"host": str(shared), "guest": "/shared"},
                         {"host": str(readonly), "guest": "/ro", "read_only": True},
                         {"host": str(shared), "guest": "/strict", "cache": "never"}]}
    # b also serves the shared folder over HTTP on a random host port (provisioned, then probed)
    spec_b = {"name": "fs-b", "memory": "128M", "mounts": [{"host": str(shared), "guest": "/mnt/shared"}],
              "network": {"mode": "isolated", "forwards": ["0:8080"]},
              "provision": ["echo provisioning b", "busybox httpd -p 8080 -h /mnt/shared"],
              "ready": [{"tcp": 8080, "timeout": 60, "hint": "busybox httpd did not start"},
                        {"command": "test -f /mnt/shared/from-host.txt"}]}
    with guest(spec_a) as a, guest(spec_b) as b:
        # provisioned once (its output in the console log), probed, and the random port answers
        assert "provisioning b" in b.console_log and "[vmctl provision 2/2: exit 0]" in b.console_log
        port = b.host_port(8080)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/from-host.txt", timeout=30) as answer:
            assert answer.read() == b"host says hi\n"
        # the mount is there at boot, from /init, as virtiofs
        assert " /shared virtiofs rw" in check(a.exec("cat /proc/mounts"))
        assert " /ro virtiofs ro" in check(a.exec("cat /proc/mounts"))
        # /init raised the mount's read-ahead to FUSE's largest request (fewer requests per MiB)
        device = check(a.exec("awk '$5 == \"/shared\" { print $3 }' /proc/self/mountinfo")).strip()
        assert check(a.exec(f"cat /sys/class/bdi/{device}/read_ahead_kb")) == "1024\n"
        assert check(a.exec("cat /shared/from-host.txt")) == "host says hi\n"
        assert check(b.exec("cat /mnt/shared/from-host.txt")) == "host says hi\n"
        # guest writes: a file, a directory, a symlink, a mode; the host sees them
        check(a.exec("echo written by a > /shared/a.txt && mkdir -p /shared/d/e && "
                     "ln -s a.txt /shared/link && chmod 640 /shared/a.txt && "
                     "dd if=/dev/zero of=/shared/d/e/big bs=64k count=32 2>/dev/null && sync"))
        assert (shared / "a.txt").read_text() == "written by a\n"
        assert os.readlink(shared / "link") == "a.txt" and (shared / "a.txt").stat().st_mode & 0o777 == 0o640
        assert (shared / "d" / "e" / "big").stat().st_size == 2 << 20
        # the other guest sees it
        eventually(b, "cat /mnt/shared/a.txt", "written by a\n")
        eventually(b, "wc -c < /mnt/shared/d/e/big", "2097152\n")
        check(b.exec("echo written by b > /mnt/shared/b.txt && rm /mnt/shared/link"))
        eventually(a, "cat /shared/b.txt", "written by b\n")
        eventually(a, "ls /shared", "a.txt\nb.txt\nd\nfrom-host.txt\n")
        # the host changes a file both have read; `never` sees it at once, `auto` within ~1 s
        assert check(a.exec("cat /strict/from-host.txt")) == "host says hi\n"
        (shared / "from-host.txt").write_text("host changed it\n")
        assert check(a.exec("cat /strict/from-host.txt; ls /strict | wc -l")) == "host changed it\n4\n"
        eventually(a, "cat /shared/from-host.txt", "host changed it\n")
        eventually(b, "cat /mnt/shared/from-host.txt", "host changed it\n")
        # read-only mount: reads work, every write fails, the host folder is untouched
        assert check(a.exec("cat /ro/keep.txt")) == "do not touch\n"
        code, _, err = a.exec("echo x > /ro/keep.txt; echo y > /ro/new; rm /ro/keep.txt; mkdir /ro/d; "
                              "[ ! -e /ro/new ] && [ -e /ro/keep.txt ]")
        assert code == 0, err
        assert "Read-only file system" in err
        # a guest cannot leave the folder: .. of the mount is the guest's own /
        check(a.exec("ls /shared/../ > /dev/null"))
        assert not (tmp_path / "escaped").exists()
        # vmctl cp both ways (no network: the tar stream goes through the transfer share)
        assert f" {XFER_GUEST} virtiofs rw" in check(a.exec("cat /proc/mounts"))
        source = Path(__file__).resolve().parents[3] / "vmctl" / "fs"
        a.put(source, "/root/")
        listing = check(a.exec("cd /root/fs && md5sum *.py | sort -k2"))
        expected = subprocess.run("md5sum *.py | sort -k2", shell=True, cwd=source, capture_output=True, text=True).stdout
        assert listing == expected
        check(a.exec("ln -s protocol.py /root/fs/link && chmod 751 /root/fs/server.py"))
        a.get("/root/fs", dest=tmp_path / "back")
        assert os.readlink(tmp_path / "back" / "link") == "protocol.py"
        assert (tmp_path / "back" / "server.py").stat().st_mode & 0o777 == 0o751
        assert (tmp_path / "back" / "protocol.py").read_bytes() == (source / "protocol.py").read_bytes()
        a.put(b"small\n", "/root/small")
        assert a.get("/root/small") == b"small\n"
    assert sorted(os.listdir(readonly)) == ["keep.txt"] and (readonly / "keep.txt").read_text() == "do not touch\n"
