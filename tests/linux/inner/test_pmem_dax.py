"""A read-only base as virtio-pmem in a real Linux guest: /init mounts it with DAX, the guest
reads its files with the right content, and the reads do not fill the guest's page cache
(they come from the VMM's shared mapping of the host file)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from vmctl.backends import get_backend
from vmctl.images import locate
from vmctl.suite.meminfo import mapped_pss
from vmctl.testing import guest

BLOB_MIB = 16


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("VMCTL_STATE_DIR", str(path))
    return path


def images_do_pmem() -> str | None:
    images = locate("busybox")
    if not images.initramfs.exists():
        return "the reference images are not built (vmctl image build)"
    if "CONFIG_FS_DAX=y" not in images.kernel_config.read_text():
        return "the reference kernel has no virtio-pmem/FS_DAX (rebuild: vmctl image build)"
    return None


def cached_kib(vm) -> int:
    code, out, err = vm.exec("grep '^Cached:' /proc/meminfo")
    assert code == 0, err
    return int(out.split()[1])


def test_guest_reads_a_dax_mounted_base_without_its_own_page_cache(tmp_path):
    if reason := images_do_pmem():
        pytest.skip(reason)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("from the shared base\n")
    blob = os.urandom(BLOB_MIB << 20)
    (tree / "blob.bin").write_bytes(blob)
    base = tmp_path / "base.ext4"
    with open(base, "wb") as handle:
        handle.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-F", "-q", "-b", "4096", "-d", str(tree), str(base)], check=True)
    spec = {"name": "dax", "memory": "256M", "pmem": [{"image": str(base), "guest": "/base"}]}
    with guest(spec) as vm:
        code, mounts, err = vm.exec("cat /proc/mounts")
        assert code == 0, err
        line = next((m for m in mounts.splitlines() if m.split()[1:2] == ["/base"]), "")
        assert line.startswith("/dev/pmem0 /base ext4 ro"), mounts
        assert "dax" in line.split()[3], line
        assert vm.exec("cat /base/hello.txt")[1] == "from the shared base\n"
        before = cached_kib(vm)
        code, out, err = vm.exec("md5sum /base/blob.bin")
        assert code == 0, err
        assert out.split()[0] == hashlib.md5(blob).hexdigest()
        # DAX: the 16 MiB were not copied into the guest's page cache
        assert cached_kib(vm) - before < (BLOB_MIB << 10) // 4
        # they are the host's page cache of the file, mapped by the VMM
        pids = list(get_backend("kvm").usage(vm.store, vm.record).pids)
        assert mapped_pss(pids, [base]) >= BLOB_MIB << 20
        # a write to the base fails in the guest and never reaches the file
        code, _, err = vm.exec("echo x > /base/hello.txt")
        assert code != 0 and "Read-only file system" in err
    assert (tmp_path / "tree" / "hello.txt").read_text() == "from the shared base\n"
