"""Creating empty qcow2 images and thin overlays, laid out as `qemu-img create` does:
header, refcount table, refcount block(s), L1 table."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ..block_backend import DiskError, probe_format
from . import constants as C
from .header import Header, parse
from .refcounts import RefcountBlock


@dataclass(frozen=True)
class CreateOptions:
    cluster_size: int = 1 << C.DEFAULT_CLUSTER_BITS
    version: int = 3  # 3 = "compat=1.1", 2 = "compat=0.10"
    refcount_bits: int = 16
    lazy_refcounts: bool = False

    def validate(self) -> int:
        """cluster_bits, or a DiskError naming the bad option."""
        bits = self.cluster_size.bit_length() - 1
        if self.cluster_size != 1 << bits or not C.MIN_CLUSTER_BITS <= bits <= C.MAX_CLUSTER_BITS:
            raise DiskError(f"cluster size {self.cluster_size} must be a power of two from "
                            "512 to 2 MiB")
        if self.version not in (2, 3):
            raise DiskError(f"qcow2 version {self.version} must be 2 or 3")
        order = self.refcount_bits.bit_length() - 1
        if self.refcount_bits != 1 << order or order > C.MAX_REFCOUNT_ORDER:
            raise DiskError(f"refcount bits {self.refcount_bits} must be a power of two <= 64")
        if self.version == 2 and self.refcount_bits != 16:
            raise DiskError("qcow2 version 2 (compat 0.10) only allows 16-bit refcounts")
        return bits


def layout(size: int, options: CreateOptions, backing: str | None = None,
           backing_format: str | None = None) -> bytes:
    """The complete bytes of a fresh image (metadata only; data clusters come later)."""
    bits = options.validate()
    cs = 1 << bits
    if size < 0 or size > C.MAX_VIRTUAL_SIZE:
        raise DiskError(f"virtual size {size} is out of range")
    size = -(-size // 512) * 512  # QEMU's block layer counts whole sectors, as qemu-img does
    l2_span = cs * (cs // 8)
    l1_size = -(-size // l2_span)
    if l1_size * 8 > C.MAX_L1_BYTES:
        raise DiskError(f"virtual size {size} needs an L1 table above 32 MiB; use bigger "
                        "clusters")
    order = options.refcount_bits.bit_length() - 1
    per_block = cs * 8 >> order
    l1_clusters = -(-l1_size * 8 // cs)
    blocks, table_clusters = 1, 1
    while True:  # the metadata must describe itself: iterate to a fixed point
        used = 1 + table_clusters + blocks + l1_clusters
        need_blocks = -(-used // per_block)
        need_table = -(-need_blocks * 8 // cs)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    header = Header(
        version=options.version, cluster_bits=bits, size=size, l1_size=l1_size,
        l1_table_offset=(1 + table_clusters + blocks) * cs if l1_size else 0,
        refcount_table_offset=cs, refcount_table_clusters=table_clusters,
        refcount_order=order,
        header_length=C.QEMU_V3_HEADER_LENGTH if options.version == 3 else C.V2_HEADER_LENGTH,
        compatible_features=C.COMPAT_LAZY_REFCOUNTS if options.lazy_refcounts else 0,
        backing_file=backing, backing_format=backing_format,
    )
    image = bytearray(header.encode())
    image += bytes(cs - len(image))
    table = bytearray(table_clusters * cs)
    for n in range(blocks):
        struct.pack_into(">Q", table, 8 * n, (1 + table_clusters + n) * cs)
    image += table
    for n in range(blocks):
        block = RefcountBlock(order, bytes(cs))
        for index in range(per_block):
            if n * per_block + index >= used:
                break
            block.set(index, 1)
        image += block.encode()
    # Like qemu-img, the file ends where the L1 table ends (a whole cluster is reserved).
    image += bytes(l1_size * 8)
    return bytes(image)


def create(path: str, size: int, options: CreateOptions = CreateOptions(), *,
           backing: str | None = None, backing_format: str | None = None,
           durable: bool = True) -> None:
    """Write a new image atomically: a temporary file in the same directory, then rename."""
    data = layout(size, options, backing, backing_format)
    write_atomically(path, data, durable=durable)


def write_atomically(path: str, data: bytes, *, durable: bool = True) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise DiskError(f"{path}: cannot create: {error.strerror}") from None
    try:
        try:
            os.write(fd, data)
            if durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        _unlink_quietly(temp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@dataclass(frozen=True)
class BaseInfo:
    path: str
    format: str
    size: int


def describe_base(path: str) -> BaseInfo:
    """Format and virtual size of a would-be backing file, reading only its header."""
    fmt = probe_format(path)
    try:
        with open(path, "rb") as file:
            file_size = os.fstat(file.fileno()).st_size
            if fmt == "raw":
                return BaseInfo(path, fmt, file_size)
            head = file.read(4096)
            bits = int.from_bytes(head[20:24], "big")
            if C.MIN_CLUSTER_BITS <= bits <= C.MAX_CLUSTER_BITS and (1 << bits) > len(head):
                file.seek(0)
                head = file.read(1 << bits)
    except OSError as error:
        raise DiskError(f"{path}: cannot read: {error.strerror}") from None
    return BaseInfo(path, fmt, parse(head, path, file_size).size)


def create_overlay(base: str, overlay: str, *, absolute: bool = False,
                   size: int | None = None, options: CreateOptions = CreateOptions(),
                   durable: bool = True) -> None:
    """A thin qcow2 overlay whose unwritten clusters read from `base`.

    The backing path is stored relative to the overlay's directory unless `absolute`,
    so a directory of base + overlays can be moved as a whole.
    """
    info = describe_base(base)
    if absolute:
        name = os.path.abspath(base)
    else:
        name = os.path.relpath(os.path.abspath(base),
                               os.path.dirname(os.path.abspath(overlay)))
    create(overlay, info.size if size is None else size, options, backing=name,
           backing_format=info.format, durable=durable)
