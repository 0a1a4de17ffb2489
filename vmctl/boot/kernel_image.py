"""Parse a kernel file: a bzImage (setup header + protected-mode part) or an ELF64 vmlinux.

Parsing checks everything it relies on and names the file and byte offset when the image
is not something vmctl can boot. Nothing is written to guest memory here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..arch import memory_map
from ..errors import VmctlError

# Setup header offsets (Documentation/arch/x86/boot.rst), identical in file and zero page.
SETUP_SECTS = 0x1F1
BOOT_FLAG = 0x1FE
JUMP = 0x200
HEADER_MAGIC = 0x202
VERSION = 0x206
LOADFLAGS = 0x211
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
PREF_ADDRESS = 0x258
INIT_SIZE = 0x260

BOOT_FLAG_VALUE = 0xAA55
HDRS = b"HdrS"
XLF_KERNEL_64 = 1 << 0
MIN_64BIT_PROTOCOL = 0x020C  # 2.12: xloadflags, the 64-bit entry point
STARTUP_64_OFFSET = 0x200  # 64-bit entry = protected-mode load address + 0x200

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1
DEFAULT_INITRD_ADDR_MAX = 0x7FFFFFFF  # what 64-bit kernels advertise; used for ELF images
DEFAULT_CMDLINE_SIZE = 2048


@dataclass(frozen=True)
class Segment:
    guest_address: int
    # A view of the file's bytes, not a copy: a bzImage is 2+ MiB, and a copy freed after
    # loading stays in the VMM's malloc heap for the life of the VM.
    data: bytes | memoryview
    memory_size: int  # >= len(data); the rest is zero-filled


@dataclass(frozen=True)
class KernelImage:
    path: Path
    kind: str  # "bzImage" or "ELF"
    entry: int  # guest-physical 64-bit entry point
    segments: list[Segment] = field(repr=False)
    setup_header: bytes | None = field(default=None, repr=False)  # bytes 0x1f1.. of a bzImage
    protocol: int | None = None
    initrd_addr_max: int = DEFAULT_INITRD_ADDR_MAX
    cmdline_size: int = DEFAULT_CMDLINE_SIZE
    init_size: int = 0  # memory the kernel needs from its load address while booting

    def without_data(self) -> KernelImage:
        """The same image with its segments' bytes dropped (addresses and sizes kept): what a
        running machine keeps once the kernel is in guest RAM, so the file's bytes are freed."""
        return replace(self, segments=[Segment(s.guest_address, b"", s.memory_size) for s in self.segments])

    @property
    def end(self) -> int:
        """First guest address past everything the kernel occupies while it boots."""
        loaded = max(s.guest_address + s.memory_size for s in self.segments)
        start = min(s.guest_address for s in self.segments)
        return max(loaded, start + self.init_size)


def read_kernel(path: Path) -> KernelImage:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise VmctlError(f"{path}: cannot read kernel: {error.strerror}") from None
    if data[:4] == ELF_MAGIC:
        return parse_elf(path, data)
    if len(data) >= HEADER_MAGIC + 4 and data[HEADER_MAGIC : HEADER_MAGIC + 4] == HDRS:
        return parse_bzimage(path, data)
    raise VmctlError(
        f"{path}: not a Linux kernel: no ELF magic at offset 0 and no 'HdrS' setup header at "
        f"offset 0x{HEADER_MAGIC:x} (give a bzImage or an ELF vmlinux)"
    )


def _u8(data: bytes, offset: int) -> int:
    return data[offset]


def _u16(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<H", data, offset)[0]
    return value


def _u32(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<I", data, offset)[0]
    return value


def parse_bzimage(path: Path, data: bytes) -> KernelImage:
    if len(data) < 0x270:
        raise VmctlError(f"{path}: bzImage truncated: {len(data)} bytes, setup header needs 0x270")
    if _u16(data, BOOT_FLAG) != BOOT_FLAG_VALUE:
        raise VmctlError(f"{path}: bad boot_flag 0x{_u16(data, BOOT_FLAG):04x} at offset 0x{BOOT_FLAG:x} (expected 0xaa55)")
    version = _u16(data, VERSION)
    if version < MIN_64BIT_PROTOCOL:
        raise VmctlError(
            f"{path}: boot protocol {version >> 8}.{version & 0xFF} at offset 0x{VERSION:x} is too old: "
            f"the 64-bit entry needs 2.12 or newer"
        )
    xloadflags = _u16(data, XLOADFLAGS)
    if not xloadflags & XLF_KERNEL_64:
        raise VmctlError(f"{path}: xloadflags 0x{xloadflags:x} at offset 0x{XLOADFLAGS:x} lacks XLF_KERNEL_64: not a 64-bit kernel")
    setup_sects = _u8(data, SETUP_SECTS) or 4
    kernel_offset = (setup_sects + 1) * 512
    if kernel_offset >= len(data):
        raise VmctlError(f"{path}: setup_sects={setup_sects} at offset 0x{SETUP_SECTS:x} points past the end of the file")
    header_end = JUMP + 2 + _u8(data, JUMP + 1)
    header = bytes(data[SETUP_SECTS:header_end])
    return KernelImage(
        path=path,
        kind="bzImage",
        entry=memory_map.BZIMAGE_LOAD_ADDRESS + STARTUP_64_OFFSET,
        segments=[Segment(memory_map.BZIMAGE_LOAD_ADDRESS, memoryview(data)[kernel_offset:], len(data) - kernel_offset)],
        setup_header=header,
        protocol=version,
        initrd_addr_max=_u32(data, INITRD_ADDR_MAX),
        cmdline_size=_u32(data, CMDLINE_SIZE),
        init_size=_u32(data, INIT_SIZE),
    )


def parse_elf(path: Path, data: bytes) -> KernelImage:
    if len(data) < 64:
        raise VmctlError(f"{path}: ELF header truncated ({len(data)} bytes)")
    if data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        raise VmctlError(f"{path}: ELF class/data at offset 4 is not 64-bit little-endian")
    (machine,) = struct.unpack_from("<H", data, 18)
    if machine != EM_X86_64:
        raise VmctlError(f"{path}: ELF e_machine {machine} at offset 0x12 is not x86-64 ({EM_X86_64})")
    entry, phoff = struct.unpack_from("<QQ", data, 24)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if phentsize < 56 or phoff + phnum * phentsize > len(data):
        raise VmctlError(f"{path}: ELF program headers at offset 0x{phoff:x} ({phnum} x {phentsize}) lie outside the file")
    segments = []
    for index in range(phnum):
        at = phoff + index * phentsize
        p_type, _flags, offset, _vaddr, paddr, filesz, memsz = struct.unpack_from("<IIQQQQQ", data, at)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if offset + filesz > len(data) or filesz > memsz:
            raise VmctlError(f"{path}: PT_LOAD program header {index} at offset 0x{at:x} has a bad file range")
        segments.append(Segment(paddr, memoryview(data)[offset : offset + filesz], memsz))
    if not segments:
        raise VmctlError(f"{path}: ELF file has no PT_LOAD segment to load")
    return KernelImage(path=path, kind="ELF", entry=entry, segments=segments)
