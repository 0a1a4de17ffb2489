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
