"""vmctl.procmem: splitting a VMM's resident memory into guest RAM and its own overhead."""

from __future__ import annotations

import mmap
import os

from vmctl.procmem import guest_region_sizes, parse_smaps, split_use, vmm_memory

SMAPS = """\
55d0c0a00000-55d0c0b00000 r-xp 00000000 08:01 1234                       /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 900 kB
Pss:                 450 kB
VmFlags: rd ex mr mw me dw
7f0000000000-7f0010000000 rw-p 00000000 00:00 0 
Size:             262144 kB
Rss:               30720 kB
Pss:               30720 kB
VmFlags: rd wr mr mw me ac hg
7f0010000000-7f0010800000 rw-p 00000000 00:00 0 
Size:               8192 kB
Rss:                  16 kB
Pss:                  16 kB
7f0020000000-7f0030000000 rw-s 00000000 00:05 99                         /memfd:other (deleted)
Size:             262144 kB
Rss:                1024 kB
Pss:                1024 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  20 kB
Pss:                  20 kB
"""


def test_parse_smaps_reads_every_mapping_with_its_name_and_counts():
    mappings = parse_smaps(SMAPS)
    assert [m.name for m in mappings] == ["/usr/bin/qemu-system-x86_64", "", "", "/memfd:other (deleted)", "[stack]"]
    assert mappings[1].size == 256 << 20
    assert (mappings[1].rss_kib, mappings[0].pss_kib) == (30720, 450)


def test_guest_ram_is_the_anonymous_mapping_shaped_like_guest_memory():
    # Both the anonymous 256 MiB mapping and a 256 MiB memfd match; the 8 MiB thread
    # stack, the binary and [stack] do not.
    use = split_use(parse_smaps(SMAPS), [256 << 20])
    assert use.guest_mappings == 2
    assert use.guest_rss_kib == 30720 + 1024
    assert use.rss_kib == 900 + 30720 + 16 + 1024 + 20
    assert use.overhead_rss_kib == 900 + 16 + 20
    assert use.overhead_pss_kib == 450 + 16 + 20


def test_a_mapping_of_another_size_is_not_guest_ram():
    use = split_use(parse_smaps(SMAPS), [512 << 20])
    assert use.guest_mappings == 0 and use.overhead_rss_kib == use.rss_kib


def test_guest_region_sizes_follow_the_mmio_gap():
    assert guest_region_sizes(256 << 20) == [256 << 20]
    sizes = guest_region_sizes(4 << 30)
    assert 4 << 30 in sizes and len(sizes) == 3  # below the gap, above 4 GiB, and QEMU's single mapping


def test_own_process_touched_pages_count_as_guest_ram():
    size = 96 << 20  # a size no other mapping of the test process has
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for offset in range(0, 16 << 20, 4096):
            area[offset] = 1
        use = vmm_memory(os.getpid(), size)
        assert use is not None and use.guest_mappings == 1
        assert 16 << 10 <= use.guest_rss_kib <= 20 << 10  # 16 MiB touched (THP may round up)
        assert use.overhead_rss_kib == use.rss_kib - use.guest_rss_kib > 0
    finally:
        area.close()


def test_a_process_that_is_gone_gives_none():
    assert vmm_memory(2**22 + 12345, 256 << 20) is None
