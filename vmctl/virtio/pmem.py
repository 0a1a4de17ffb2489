"""virtio-pmem (spec 5.19, device id 27): a host file mapped into guest-physical memory.

The guest sees the file as persistent memory (/dev/pmemN). Mounted with `-o dax`, its
file systems read file data straight from this mapping: no block I/O and no copy in the
guest's page cache. The mapping is the host's page cache of the file, MAP_SHARED and
PROT_READ, so every guest mapping the same file shares one copy of it with the host
(how Kata Containers shares a read-only base between VMs).

vmctl's pmem is read-only: the memory slot is KVM_MEM_READONLY (a guest write is an MMIO
exit that no device claims, and is dropped). The region is the file's size rounded up to
2 MiB (the guest's ZONE_DEVICE memory map works in 2 MiB subsections); the part past the
end of the file reads as zeros.

Config space: le64 start, le64 size (guest-physical). One request queue: a request is
le32 type (0 = FLUSH), the reply le32 ret (0 ok). A flush fsyncs the file.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct

from ..kvm.ioctl import libc
from .device import ID_PMEM, DeviceError, QueueContext, VirtioDevice
from .queue import DescriptorChain, Virtqueue, split_front

log = logging.getLogger(__name__)

REQ_FLUSH = 0
RET_OK = 0
RET_ERROR = 1  # anything non-zero: the guest's flush returns -EIO
REGION_ALIGN = 2 << 20
_PAGE = 4096
_MAP_FAILED = ctypes.c_void_p(-1).value
_CONFIG = struct.Struct("<QQ")
_WORD = struct.Struct("<I")


def region_size(file_size: int) -> int:
    """Guest-physical size of the region for a file of `file_size` bytes."""
    return max(REGION_ALIGN, -(-file_size // REGION_ALIGN) * REGION_ALIGN)


class PmemDevice(VirtioDevice):
    device_id = ID_PMEM
    queue_sizes = (128,)
    name = "pmem"

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.host_address = 0
        try:
            self.file_size = os.fstat(self.fd).st_size
            if self.file_size == 0:
                raise OSError(f"{path}: an empty file cannot be pmem")
            self.size = region_size(self.file_size)
            self.host_address = _map(self.fd, self.file_size, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self.start = 0  # guest-physical, set by `place` when the machine maps the region
        self.flushes = 0

    # --- where the region lives ---------------------------------------------------------------
    def shared_memory(self) -> tuple[int, int] | None:
        return self.host_address, self.size

    def place(self, guest_address: int) -> None:
        self.start = guest_address

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.start, self.size)

    # --- the request queue --------------------------------------------------------------------
    def process(self, index: int, queue: Virtqueue, ctx: QueueContext) -> None:
        for chain in queue.drain():
            ctx.complete(queue, chain, self.handle(chain, ctx))

    def handle(self, chain: DescriptorChain, ctx: QueueContext) -> int:
        """Serve one request; returns the bytes written (the 4-byte reply). DeviceError when
        the chain has no 4-byte request or no room for the reply."""
        request, _ = split_front(chain.readable_views(ctx.memory), _WORD.size)
        head = b"".join(bytes(v) for v in request)
        if len(head) < _WORD.size:
            raise DeviceError(f"pmem request is {len(head)} bytes, not {_WORD.size}")
        reply, _ = split_front(chain.writable_views(ctx.memory), _WORD.size)
        if sum(v.nbytes for v in reply) < _WORD.size:
            raise DeviceError("pmem request has no 4-byte device-writable reply")
        (kind,) = _WORD.unpack(head)
        ret = self.flush() if kind == REQ_FLUSH else RET_ERROR
        data = _WORD.pack(ret)
        done = 0
        for view in reply:
            view[:] = data[done : done + view.nbytes]
            done += view.nbytes
        return _WORD.size

    def flush(self) -> int:
        """The guest asks for its writes to be durable: a read-only file has none, but the
        contract is fsync, and fsync is cheap on a clean file."""
        self.flushes += 1
        try:
            os.fsync(self.fd)
        except OSError as error:
            log.warning("virtio-pmem %s: fsync: %s", self.path, error)
            return RET_ERROR
        return RET_OK

    def close(self) -> None:
        if self.host_address:
            munmap = libc().munmap
            munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
            munmap(self.host_address, self.size)
            self.host_address = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _map(fd: int, file_size: int, size: int) -> int:
    """`size` bytes of read-only host address space: zeros, with the file mapped shared over
    the start (MAP_FIXED), so the region is contiguous even when the file is not 2 MiB-sized."""
    mm = libc().mmap
    mm.restype = ctypes.c_void_p
    mm.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    address = mm(None, size, mmap.PROT_READ, flags, -1, 0)
    if address in (None, _MAP_FAILED):
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot reserve {size} bytes for pmem: {os.strerror(errno)}")
    file_pages = -(-file_size // _PAGE) * _PAGE
    fixed = mm(address, file_pages, mmap.PROT_READ, mmap.MAP_SHARED | getattr(mmap, "MAP_FIXED", 0x10), fd, 0)
    if fixed != address:
        errno = ctypes.get_errno()
        munmap = libc().munmap
        munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        munmap(address, size)
        raise OSError(errno, f"cannot map the pmem file: {os.strerror(errno)}")
    madvise = libc().madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise(address, size, 16)  # MADV_DONTDUMP: not in a core dump of the VMM
    return int(address)
