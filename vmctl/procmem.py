"""What a VMM process costs in memory beyond its guest: `/proc/PID/smaps` split into the
guest-RAM mapping(s) and everything else.

VmRSS counts the guest pages the VMM has touched, which depends on the guest (what its
kernel and initramfs wrote), not on the VMM. Subtracting the guest mapping's Rss leaves
the VMM's own overhead: interpreter or binary, libraries, heap, thread stacks, buffers.
The guest mapping is recognised by shape, the same for any VMM: an anonymous mapping
(no file, or QEMU's memfd-less RAM) at least as large as the guest's RAM region and at most
`slack` bytes larger (QEMU and vmctl both pad for 2 MiB alignment).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

KIB = 1024


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    name: str  # pathname, [heap], [stack]... or "" for anonymous
    rss_kib: int
    pss_kib: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class MemoryUse:
    """One sample of a VMM process, in KiB."""

    rss_kib: int
    pss_kib: int
    guest_rss_kib: int  # resident pages of the guest-RAM mapping(s)
    guest_pss_kib: int
    guest_mappings: int  # how many mappings were taken for guest RAM

    @property
    def overhead_rss_kib(self) -> int:
        """Resident memory that is not guest RAM: what the VMM itself costs."""
        return self.rss_kib - self.guest_rss_kib

    @property
    def overhead_pss_kib(self) -> int:
        return self.pss_kib - self.guest_pss_kib


def parse_smaps(text: str) -> list[Mapping]:
    """The mappings of a /proc/PID/smaps text (header lines and their Rss/Pss fields)."""
    mappings: list[Mapping] = []
    start = end = 0
    name = ""
    rss = pss = 0
    have = False
    for line in text.splitlines():
        head = line.split(None, 1)[0] if line else ""
        if head and not head.endswith(":") and "-" in head:  # "start-end perms offset dev inode [name]"
            if have:
                mappings.append(Mapping(start, end, name, rss, pss))
            fields = line.split(None, 5)
            low, high = fields[0].split("-")
            start, end = int(low, 16), int(high, 16)
            name = fields[5].strip() if len(fields) > 5 else ""
            rss = pss = 0
            have = True
        elif head == "Rss:":
            rss = int(line.split()[1])
        elif head == "Pss:":
            pss = int(line.split()[1])
    if have:
        mappings.append(Mapping(start, end, name, rss, pss))
    return mappings


def is_guest_ram(mapping: Mapping, region_sizes: list[int], slack: int) -> bool:
    """Anonymous (or a RAM memfd) and sized like one of the guest's RAM regions."""
    anonymous = mapping.name == "" or mapping.name.startswith("/memfd:")
    return anonymous and any(size <= mapping.size <= size + slack for size in region_sizes)


def split_use(mappings: list[Mapping], region_sizes: list[int], slack: int = 8 << 20) -> MemoryUse:
    guest = [m for m in mappings if is_guest_ram(m, region_sizes, slack)]
    return MemoryUse(
        rss_kib=sum(m.rss_kib for m in mappings),
        pss_kib=sum(m.pss_kib for m in mappings),
        guest_rss_kib=sum(m.rss_kib for m in guest),
        guest_pss_kib=sum(m.pss_kib for m in guest),
        guest_mappings=len(guest),
    )


def guest_region_sizes(memory: int) -> list[int]:
    """The host mappings a guest of `memory` bytes gets (vmctl: RAM below the 3 GiB MMIO
    gap and the rest above 4 GiB, each its own mapping; QEMU: one mapping of it all)."""
    from .arch.memory_map import ram_layout

    return sorted({memory, *(size for _, size in ram_layout(memory))})


def vmm_memory(pid: int, guest_memory: int) -> MemoryUse | None:
    """Sample process `pid` running a guest of `guest_memory` bytes; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    return split_use(parse_smaps(text), guest_region_sizes(guest_memory))
