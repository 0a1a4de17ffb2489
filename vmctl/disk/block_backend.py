"""The block-backend interface every disk format implements, and the errors it raises.

The virtio-blk device hands guest memory to a backend as lists of memoryviews
(scatter-gather), so reads and writes never copy through an intermediate bytes object.
"""

from __future__ import annotations

import abc
from typing import Callable, Iterator, Sequence

from ..errors import VmctlError

SECTOR = 512
IOV_MAX = 1024  # Linux limit on iovecs per preadv/pwritev call


class DiskError(VmctlError):
    """Any failure of a disk image: format, I/O, lock or range."""


class DiskFormatError(DiskError):
    """An image whose on-disk structure is invalid: names the file, field and byte offset."""

    def __init__(self, path: str, field: str, offset: int, problem: str) -> None:
        self.path, self.field, self.offset, self.problem = path, field, offset, problem
        super().__init__(f"{path}: {field} at byte offset {offset:#x}: {problem}")


class UnsupportedFeatureError(DiskFormatError):
    """A valid image using a feature vmctl does not implement (encryption, external data...)."""


class ImageCorruptError(DiskFormatError):
    """A write would have destroyed metadata (or a table entry is impossible): the write was
    refused and, for version 3 images, the corrupt bit set, as QEMU does."""


class DiskRangeError(DiskError):
    """A request outside the virtual disk."""


class ReadOnlyError(DiskError):
    """A write to a backend opened read-only."""


class BlockBackend(abc.ABC):
    """A virtual disk: byte-addressed, scatter-gather I/O, explicit flush.

    Thread safety: each backend serialises its own requests, so a device may call it from
    several queue threads. All sizes and offsets are in bytes.
    """

    path: str

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Virtual disk size in bytes."""

    @property
    @abc.abstractmethod
    def read_only(self) -> bool:
        """True when writes, discards and write-zeroes are refused."""

    @property
    def discard_granularity(self) -> int:
        """Smallest discard unit that frees space (the cluster size for qcow2)."""
        return SECTOR

    @abc.abstractmethod
    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Fill `buffers` in order with disk bytes from `offset`; returns the byte count."""

    def readinto_iovecs(self, offset: int, iovecs: "Iovecs") -> int:
        """`readinto` for buffers given as a packed iovec array; formats that need the data
        in Python (qcow2 maps it cluster by cluster) take views, a raw file overrides it."""
        return self.readinto(offset, ByteViews(iovecs.views(), iovecs.nbytes))

    def write_iovecs(self, offset: int, iovecs: "Iovecs") -> int:
        return self.write(offset, ByteViews(iovecs.views(), iovecs.nbytes))

    @abc.abstractmethod
    def write(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Write the concatenation of `buffers` at `offset`; returns the byte count."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable (guest FLUSH)."""

    @abc.abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Hint that a range is unused; may free space, contents afterwards are unspecified."""

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read back as zeros, cheaply where the format allows."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush, release the lock and close files. Idempotent."""

    # Conveniences built on the primitives (tests, CLI and tools use these).

    def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.readinto(offset, [memoryview(buffer)])
        return bytes(buffer)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        return self.write(offset, [memoryview(data)])

    def __enter__(self) -> "BlockBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskRangeError(
                f"{self.path}: {what} of {length} bytes at offset {offset:#x} is outside the "
                f"disk (size {self.size:#x})"
            )

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: {what} refused: disk is open read-only")


class ByteViews(list[memoryview]):
    """Views a caller already knows to be flat unsigned-byte memoryviews, with their total
    length: a virtio-blk request's pages (slices of guest RAM, lengths from the descriptor
    chain). The backend then skips checking and summing them one by one, which for a 1 MiB
    request of 256 pages was most of its Python cost."""

    def __init__(self, views: list[memoryview], nbytes: int) -> None:
        super().__init__(views)
        self.nbytes = nbytes


class Iovecs:
    """Buffers as a packed array of `struct iovec` (host address, length), for a backend
    that hands them to preadv/pwritev as they are: virtio-blk builds it from a request's
    descriptor table in a few C-level operations, where a memoryview per 4 KiB guest page
    (then os.preadv taking a buffer of each) was most of a 1 MiB request's Python cost.
    The caller keeps the memory mapped for the call; `views` makes memoryviews of the same
    buffers for any other use (qcow2, a short read's zero fill)."""

    __slots__ = ("packed", "count", "nbytes", "views")

    def __init__(self, packed: bytes, nbytes: int, views: Callable[[], list[memoryview]]) -> None:
        self.packed = packed
        self.count = len(packed) // 16
        self.nbytes = nbytes
        self.views = views


def as_bytes_views(buffers: Sequence[memoryview | bytes | bytearray]) -> list[memoryview]:
    """Flat unsigned-byte views, so slices can be assigned and lengths are byte counts."""
    if isinstance(buffers, ByteViews):
        return buffers
    views = []
    for buffer in buffers:
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        views.append(view)
    return views


def total_length(buffers: Sequence[memoryview]) -> int:
    if isinstance(buffers, ByteViews):
        return buffers.nbytes
    return sum(view.nbytes for view in buffers)


def slice_buffers(buffers: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The sub-list of views covering bytes [start, start+length) of the concatenation."""
    if len(buffers) == 1:
        return [buffers[0][start : start + length]]
    out = []
    position = 0
    end = start + length
    for view in buffers:
        size = view.nbytes
        if position + size > start and position < end:
            lo = max(start - position, 0)
            hi = min(end - position, size)
            out.append(view[lo:hi])
        position += size
        if position >= end:
            break
    return out


def chunks(views: list[memoryview]) -> Iterator[list[memoryview]]:
    """Split an iovec list so no single system call exceeds IOV_MAX entries."""
    for index in range(0, len(views), IOV_MAX):
        yield views[index : index + IOV_MAX]


def probe_format(path: str) -> str:
    """'qcow2' when the file starts with the qcow2 magic, else 'raw'."""
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError as error:
        raise DiskError(f"{path}: cannot open: {error.strerror}") from None
    return "qcow2" if magic == b"QFI\xfb" else "raw"


def open_disk(path: str, read_only: bool = False, *, format: str | None = None,
              lock: bool = True, _chain: tuple[str, ...] = ()) -> BlockBackend:
    """Open a raw or qcow2 disk (probed from its magic unless `format` is given).

    Writers take an exclusive lock compatible with QEMU's; read-only opens (bases of
    overlays) share the file with other readers.
    """
    fmt = format or probe_format(path)
    if fmt == "qcow2":
        from .qcow2.image import Qcow2Image

        return Qcow2Image(path, read_only=read_only, lock=lock, _chain=_chain)
    if fmt == "raw":
        from .raw import RawDisk

        return RawDisk(path, read_only=read_only, lock=lock)
    raise DiskError(f"{path}: unsupported disk format {fmt!r} (raw or qcow2)")
