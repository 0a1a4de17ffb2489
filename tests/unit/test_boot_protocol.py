"""Boot protocol pieces without KVM: kernel parsing, zero page, e820, page tables, GDT, MP table."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

from vmctl.arch import gdt, memory_map, paging
from vmctl.arch.mptable import build_mptable
from vmctl.boot import kernel_image, params
from vmctl.boot.loader import load_linux
from vmctl.errors import VmctlError
from vmctl.memory import GuestMemory


def make_bzimage(path: Path, version: int = 0x020F, xloadflags: int = 1, payload: bytes = b"\x90" * 4096,
                 setup_sects: int = 4, init_size: int = 0x200000) -> Path:
    """A file with a real-format setup header (what `make bzImage` writes), small payload."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[kernel_image.SETUP_SECTS] = setup_sects
    struct.pack_into("<H", setup, kernel_image.BOOT_FLAG, 0xAA55)
    setup[kernel_image.JUMP : kernel_image.JUMP + 2] = bytes([0xEB, 0x6A])  # header ends at 0x26c
    setup[kernel_image.HEADER_MAGIC : kernel_image.HEADER_MAGIC + 4] = b"HdrS"
    struct.pack_into("<H", setup, kernel_image.VERSION, version)
    setup[kernel_image.LOADFLAGS] = 0x01
    struct.pack_into("<I", setup, kernel_image.INITRD_ADDR_MAX, 0x7FFFFFFF)
    struct.pack_into("<I", setup, kernel_image.KERNEL_ALIGNMENT, 0x200000)
    struct.pack_into("<H", setup, kernel_image.XLOADFLAGS, xloadflags)
    struct.pack_into("<I", setup, kernel_image.CMDLINE_SIZE, 2047)
    struct.pack_into("<I", setup, kernel_image.INIT_SIZE, init_size)
    path.write_bytes(bytes(setup) + payload)
    return path


@pytest.fixture
def memory():
    ram = GuestMemory(memory_map.ram_layout(64 << 20))
    yield ram
    ram.close()


def test_bzimage_header_is_parsed(tmp_path):
    image = kernel_image.read_kernel(make_bzimage(tmp_path / "bzImage"))
    assert image.kind == "bzImage"
    assert image.protocol == 0x020F
    assert image.entry == 0x100000 + 0x200
    assert image.segments[0].guest_address == 0x100000
    assert len(image.segments[0].data) == 4096
    assert image.setup_header[: 0x202 - 0x1F1 + 4][-4:] == b"HdrS"
    assert len(image.setup_header) == 0x26C - 0x1F1
    assert image.end == 0x100000 + 0x200000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"version": 0x020A}, "boot protocol 2.10 at offset 0x206 is too old"),
        ({"xloadflags": 0}, "lacks XLF_KERNEL_64"),
        ({"setup_sects": 200, "payload": b""}, "setup_sects=200 at offset 0x1f1"),
    ],
)
def test_bad_bzimage_is_refused_with_the_offset(tmp_path, kwargs, message):
    with pytest.raises(VmctlError, match=message):
        kernel_image.read_kernel(make_bzimage(tmp_path / "bzImage", **kwargs))


def test_not_a_kernel(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello" * 200)
    with pytest.raises(VmctlError, match=r"junk: not a Linux kernel.*offset 0x202"):
        kernel_image.read_kernel(junk)


def test_elf_pt_load_segments(tmp_path):
    # A minimal ELF64 with one PT_LOAD at 16 MiB (like vmlinux: paddr 0x1000000).
    code = b"\xf4" * 32
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 2, 62, 1, 0x1000000, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 120, 0xFFFFFFFF81000000, 0x1000000, len(code), 0x1000, 0x1000)
    path = tmp_path / "vmlinux"
    path.write_bytes(bytes(header) + phdr + code)
    image = kernel_image.read_kernel(path)
    assert image.kind == "ELF" and image.entry == 0x1000000
    assert image.segments[0].guest_address == 0x1000000
    assert image.segments[0].memory_size == 0x1000
    assert image.end == 0x1001000


def test_e820_map_covers_ram_and_reserves_the_ebda():
    entries = params.e820_map(memory_map.ram_layout(4 << 30))
    assert [(e.address, e.size, e.type) for e in entries] == [
        (0, 0x9FC00, params.E820_RAM),
        (0x9FC00, 0x400, params.E820_RESERVED),
        (0x100000, 0xC0000000 - 0x100000, params.E820_RAM),
        (1 << 32, (4 << 30) - 0xC0000000, params.E820_RAM),
    ]


def test_zero_page_from_bzimage_header(tmp_path, memory):
    kernel = make_bzimage(tmp_path / "bzImage")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x07" * 10000)
    info = load_linux(memory, kernel, initrd, "console=ttyS0 quiet")
    page = memory.read(memory_map.ZERO_PAGE_ADDRESS, 4096)
    assert page[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55
    assert page[params.TYPE_OF_LOADER] == 0xFF
    assert page[params.LOADFLAGS] & params.LOADED_HIGH
    assert struct.unpack_from("<I", page, params.CMD_LINE_PTR)[0] == memory_map.CMDLINE_ADDRESS
    assert memory.read(memory_map.CMDLINE_ADDRESS, 20) == b"console=ttyS0 quiet\0"
    ramdisk, size = struct.unpack_from("<II", page, params.RAMDISK_IMAGE)
    assert (ramdisk, size) == info.initrd and size == 10000
    assert ramdisk % 4096 == 0 and ramdisk + size <= 64 << 20
    assert memory.read(ramdisk, 10000) == b"\x07" * 10000
    assert params.read_e820(page) == info.e820
    assert memory.read(0x100000, 4096) == b"\x90" * 4096


def test_a_loaded_machine_keeps_no_kernel_bytes(tmp_path, memory):
    # The running VMM keeps BootInfo; the file's bytes (MiBs for a bzImage) are in guest RAM.
    info = load_linux(memory, make_bzimage(tmp_path / "bzImage"), None, "")
    assert [len(segment.data) for segment in info.kernel.segments] == [0]
    assert info.kernel.end == 0x100000 + 0x200000  # sizes and addresses stay
    assert memory.read(0x100000, 4096) == b"\x90" * 4096


def test_initrd_is_read_straight_into_guest_ram_across_short_reads(memory):
    # A raw stream may return fewer bytes than asked (pipes, network file systems): the
    # loader keeps reading until the guest-RAM view is full, and reports a short file.
    from vmctl.boot import loader

    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data, self.at = data, 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:  # at most 1000 bytes per call
            count = min(1000, len(buffer), len(self.data) - self.at)
            buffer[:count] = self.data[self.at : self.at + count]
            self.at += count
            return count

    data = bytes(range(256)) * 40
    assert loader._read_into(Trickle(data), memory.view(0x400000, len(data))) == len(data)
    assert memory.read(0x400000, len(data)) == data
    assert loader._read_into(Trickle(data[:5000]), memory.view(0x400000, len(data))) == 5000


def test_unreadable_initrd_is_named(tmp_path, memory):
    with pytest.raises(VmctlError, match=r"initrd: cannot read initrd"):
        load_linux(memory, make_bzimage(tmp_path / "bzImage"), tmp_path / "initrd", "")


def test_initrd_respects_initrd_addr_max(tmp_path):
    ram = GuestMemory(memory_map.ram_layout(1 << 30))
    try:
        kernel = make_bzimage(tmp_path / "bzImage")
        data = bytearray(kernel.read_bytes())
        struct.pack_into("<I", data, kernel_image.INITRD_ADDR_MAX, 0x0FFFFFFF)  # 256 MiB - 1
        kernel.write_bytes(bytes(data))
        initrd = tmp_path / "initrd"
        initrd.write_bytes(b"x" * 5000)
        address, size = load_linux(ram, kernel, initrd, "").initrd
        assert address + size <= 0x10000000
    finally:
        ram.close()


def test_memory_too_small_for_kernel_and_initrd(tmp_path, memory):
    kernel = make_bzimage(tmp_path / "bzImage", init_size=60 << 20)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x" * (8 << 20))
    with pytest.raises(VmctlError, match="too small for the kernel"):
        load_linux(memory, kernel, initrd, "")


def test_cmdline_too_long(tmp_path, memory):
    with pytest.raises(VmctlError, match="command line is 3000 bytes.*at most 2047"):
        load_linux(memory, make_bzimage(tmp_path / "bzImage"), None, "x" * 3000)


def test_identity_page_tables_map_4_gib_with_2_mib_pages():
    tables = paging.identity_map_tables()
    pml4 = struct.unpack("<512Q", tables[memory_map.PML4_ADDRESS])
    assert pml4[0] == memory_map.PDPT_ADDRESS | 0x3 and not any(pml4[1:])
    pdpt = struct.unpack("<512Q", tables[memory_map.PDPT_ADDRESS])
    assert pdpt[:4] == tuple(memory_map.PD_ADDRESS + i * 4096 | 0x3 for i in range(4))
    directories = struct.unpack(f"<{4 * 512}Q", tables[memory_map.PD_ADDRESS])
    for index in (0, 1, 511, 1535, 2047):
        assert directories[index] == (index << 21) | 0x83
    # The page directories end before the command line.
    assert memory_map.PD_ADDRESS + len(tables[memory_map.PD_ADDRESS]) <= memory_map.CMDLINE_ADDRESS


def test_gdt_matches_boot_protocol_selectors():
    table = gdt.gdt_bytes()
    assert struct.unpack_from("<Q", table, gdt.BOOT_CS)[0] == 0x00AF9B000000FFFF
    assert struct.unpack_from("<Q", table, gdt.BOOT_DS)[0] == 0x00CF93000000FFFF
    code = gdt.segment(gdt.BOOT_CS)
    assert (code.selector, code.l, code.db, code.g, code.type, code.present, code.s) == (0x10, 1, 0, 1, 0xB, 1, 1)
    assert code.limit == 0xFFFFFFFF
    data = gdt.segment(gdt.BOOT_DS)
    assert (data.selector, data.l, data.db, data.type) == (0x18, 0, 1, 3)


def _checksum_ok(data: bytes) -> bool:
    return sum(data) % 256 == 0


@pytest.mark.parametrize("cpus", [1, 2, 8, 32])
def test_mp_table_checksums_and_contents(cpus):
    table = build_mptable(cpus)
    data = table.data
    assert data[:4] == b"_MP_" and _checksum_ok(data[:16])
    config_address = struct.unpack_from("<I", data, 4)[0]
    assert config_address == table.address + 16
    config = data[16:]
    assert config[:4] == b"PCMP"
    length, revision = struct.unpack_from("<HB", config, 4)
    assert length == len(config) and revision == 4 and _checksum_ok(config)
    entry_count, lapic = struct.unpack_from("<HI", config, 34)
    assert lapic == memory_map.LAPIC_ADDRESS
    offset, processors, ioapics = 44, [], []
    for _ in range(entry_count):
        kind = config[offset]
        if kind == 0:
            processors.append(config[offset + 1 : offset + 4])
            offset += 20
        else:
            if kind == 2:
                ioapics.append(struct.unpack_from("<BBBBI", config, offset))
            offset += 8
    assert offset == length
    assert [p[0] for p in processors] == list(range(cpus))
    assert processors[0][2] == 3 and all(p[2] == 1 for p in processors[1:])  # BSP flag on CPU 0
    assert ioapics == [(2, cpus, 0x11, 1, memory_map.IOAPIC_ADDRESS)]


def test_mp_table_fits_in_the_ebda_or_says_so():
    with pytest.raises(ValueError, match="does not fit below 640 KiB"):
        build_mptable(64)


def test_real_bzimage_and_vmlinux_of_the_reference_kernel(reference_kernel, memory):
    bz = kernel_image.read_kernel(reference_kernel.bzimage)
    assert bz.kind == "bzImage" and bz.protocol >= 0x020F
    raw = reference_kernel.bzimage.read_bytes()
    assert len(bz.segments[0].data) == len(raw) - (raw[0x1F1] + 1) * 512
    assert bz.init_size > len(bz.segments[0].data)  # it decompresses past its own end
    info = load_linux(memory, reference_kernel.bzimage, None, "console=ttyS0")
    page = memory.read(memory_map.ZERO_PAGE_ADDRESS, 4096)
    assert page[0x1F1 : 0x1F1 + len(bz.setup_header)][0x202 - 0x1F1 :][:4] == b"HdrS"
    assert page[params.TYPE_OF_LOADER] == 0xFF and info.entry == 0x100200
    elf = kernel_image.read_kernel(reference_kernel.vmlinux)
    assert elf.kind == "ELF" and elf.entry == min(s.guest_address for s in elf.segments) == 0x1000000
