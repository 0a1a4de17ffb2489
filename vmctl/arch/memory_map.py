"""Where things live in guest-physical memory, for every VM vmctl builds.

    0x0000_0500  GDT                 0x0000_7000  zero page (boot_params)
    0x0000_0520  IDT (empty)         0x0000_8ff0  boot stack top
    0x0000_9000  PML4                0x0000_a000  PDPT
    0x0000_b000  4 page directories (identity map of the first 4 GiB with 2 MiB pages)
    0x0002_0000  kernel command line
    0x0009_fc00  MP floating pointer + config table (EBDA, reserved in e820)
    0x0010_0000  kernel (bzImage protected-mode part; vmlinux loads at its own p_paddr)
    ...          initrd at the top of low RAM, below the kernel's initrd_addr_max
    0xc000_0000  start of the 32-bit MMIO gap (no RAM until 4 GiB)
    0xd000_0000  virtio-mmio device slots, 4 KiB each
    0xfec0_0000  IOAPIC       0xfee0_0000  LAPIC
    0xfffb_c000  KVM identity map page, 0xfffb_d000 KVM TSS (3 pages)
    4 GiB        RAM past 3 GiB, if any
    then         device memory (virtio-pmem regions), each on a 128 MiB boundary
"""

from __future__ import annotations

GDT_ADDRESS = 0x500
IDT_ADDRESS = 0x520
ZERO_PAGE_ADDRESS = 0x7000
BOOT_STACK_ADDRESS = 0x8FF0
PML4_ADDRESS = 0x9000
PDPT_ADDRESS = 0xA000
PD_ADDRESS = 0xB000
IDENTITY_MAPPED_GIB = 4
CMDLINE_ADDRESS = 0x20000
CMDLINE_MAX_SIZE = 0x10000
EBDA_ADDRESS = 0x9FC00
MPTABLE_ADDRESS = EBDA_ADDRESS
LOW_RAM_END = 0xA0000  # 640 KiB: legacy VGA/BIOS area above it is reserved
HIGH_MEMORY_START = 0x100000
BZIMAGE_LOAD_ADDRESS = HIGH_MEMORY_START

MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 1 << 32
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SLOT_SIZE = 0x1000
IOAPIC_ADDRESS = 0xFEC0_0000
LAPIC_ADDRESS = 0xFEE0_0000
KVM_IDENTITY_MAP_ADDRESS = 0xFFFB_C000
KVM_TSS_ADDRESS = 0xFFFB_D000


def ram_layout(memory_size: int) -> list[tuple[int, int]]:
    """RAM regions (guest_address, size): RAM from 0, with the part past 3 GiB moved above 4 GiB."""
    low = min(memory_size, MMIO_GAP_START)
    regions = [(0, low)]
    if memory_size > low:
        regions.append((MMIO_GAP_END, memory_size - low))
    return regions


# virtio-pmem regions: the guest hot-plugs them as ZONE_DEVICE memory, whose sections are
# 128 MiB on x86-64 (sub-sections of 2 MiB work too, but a section-aligned start is safe on
# every kernel).
DEVICE_MEMORY_ALIGN = 128 << 20


def device_memory_base(memory_size: int) -> int:
    """First guest-physical address for device memory: above RAM and the 32-bit MMIO gap."""
    end = max(MMIO_GAP_END, max(start + size for start, size in ram_layout(memory_size)))
    return align_device_memory(end)


def align_device_memory(address: int) -> int:
    return -(-address // DEVICE_MEMORY_ALIGN) * DEVICE_MEMORY_ALIGN
