"""Host memory accounting of the page-cache suite: the PSS of a process's mappings of a file
(a VMM mapping a DAX base) is found in /proc/PID/smaps, so it is not counted twice."""

from __future__ import annotations

import mmap
import os

from vmctl.suite.meminfo import mapped_pss, pss


def test_mapped_pss_counts_only_the_named_files_mappings(tmp_path):
    path = tmp_path / "base.bin"
    path.write_bytes(os.urandom(1 << 20))
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 4096)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as view:
        assert sum(view[i] for i in range(0, len(view), 4096)) >= 0  # touch every page
        pid = os.getpid()
        counted = mapped_pss([pid], [path])
        assert 0 < counted <= 1 << 20
        assert counted <= pss([pid])
        assert mapped_pss([pid], [other]) == 0
    assert mapped_pss([pid], [path]) == 0  # unmapped
    assert mapped_pss([2 ** 22 + 1], [path]) == 0  # no such process


def test_dax_variant_reads_the_same_files_under_the_pmem_mount():
    from vmctl.images.rootfs import BENCH_DATA_DIR
    from vmctl.suite.columns.base import DAX_MOUNT
    from vmctl.suite.pagecache import dax_mount_script, read_script

    assert read_script(True) == f"cat /{BENCH_DATA_DIR}/shared-0.bin > /dev/null"
    assert read_script(True, DAX_MOUNT) == f"cat {DAX_MOUNT}/{BENCH_DATA_DIR}/shared-0.bin > /dev/null"
    script = dax_mount_script()
    # mounts /dev/pmem0 only where /init did not, and insists on a DAX mount
    assert "mount -t ext4 -o ro,dax /dev/pmem0 " + DAX_MOUNT in script and script.endswith("grep -q dax")


def test_the_vm_column_gets_a_step_per_page_cache_lever(monkeypatch):
    from vmctl.suite import pagecache, runner
    from vmctl.suite.model import HOST, Column

    monkeypatch.setattr(pagecache, "ksm_available", lambda: True)
    options = runner.Options(suites=["pagecache"], columns=["vm"])
    names = [name for name, _ in runner._steps(options, HOST, Column("vm", HOST, "vm"), None, [], None, None,
                                                None, None, None)]
    assert names == ["pagecache", "pagecache+ksm", "pagecache+dax"]
    native = [name for name, _ in runner._steps(options, HOST, Column("native", HOST, "native"), None, [], None,
                                                 None, None, None, None)]
    assert native == ["pagecache"]
