"""virtio-blk (spec 5.2): request queues over a `BlockBackend` (raw file or qcow2).

Data moves with scatter-gather straight between the disk file and guest memory: the chain's
buffers become memoryviews of guest RAM handed to the backend's preadv/pwritev. The request
header, discard segments and status byte may be split across descriptors any way the
driver likes (the spec forbids assuming a framing).

Per kick the device takes every available request at once and returns them with one
used-index update and at most one interrupt. Where the host has CPUs to spare beyond the
vCPUs and the worker, large reads and writes of one batch run in parallel on a small thread
pool (preadv/pwritev release the GIL, so copies overlap with the Python work of the next
request); flushes and the other commands wait for the requests before them. With VIRTIO_BLK_F_MQ the device has one queue per vCPU (`fit_machine`), so the
guest's CPUs do not contend for one ring.
"""

from __future__ import annotations

import logging
import os
import struct
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..disk.block_backend import BlockBackend, ByteViews, DiskError, Iovecs, open_disk
from ..memory import GuestMemory
from .device import ID_BLOCK, DeviceError, QueueContext, VirtioDevice
from .queue import DescriptorChain, Virtqueue, split_back, split_front

log = logging.getLogger(__name__)

SECTOR = 512
QUEUE_SIZE = 256
SERIAL_LENGTH = 20  # VIRTIO_BLK_ID_BYTES

# Feature bits
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH = 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 9
F_MQ, F_DISCARD, F_WRITE_ZEROES = 1 << 12, 1 << 13, 1 << 14

# Request types
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
# Status byte values
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2

SEG_MAX = QUEUE_SIZE - 2  # leaves room for the header and status descriptors
SIZE_MAX = 1 << 20
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per range: Linux splits larger discards
MAX_DISCARD_SEGMENTS = 32
_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
_ENTRY = struct.Struct("<QI4x")  # a descriptor's address and length
SEGMENT_F_UNMAP = 1
MAX_QUEUES = 16  # request queues with F_MQ: one per vCPU, up to this many
# Reads and writes at least this large go to the pool when a batch has several: below it
# the hand-off (a future, a thread wake-up) costs more than the copy it would overlap.
PARALLEL_BYTES = 64 << 10
POOL_THREADS = 4  # at most


def spare_cpus(vcpus: int) -> int:
    """Host CPUs left after the vCPU threads and the device worker: the pool's threads only
    pay off on those (on the 2-CPU development host they lost 25% to the extra hand-offs,
    benchmarks-virtio.md), so a machine without spare CPUs serves its batches serially."""
    return max(0, (os.cpu_count() or 1) - vcpus - 1)


@dataclass(slots=True)
class BlkRequest:
    """One parsed request: what to do, and the guest views it moves data through."""

    kind: int
    sector: int
    readable: list[memoryview]  # after the header: write data, discard segments
    data_out: list[memoryview]  # before the status byte: read data, ID
    status: memoryview
    lengths: tuple[int, int]  # (readable, data_out) byte counts
    iovecs: Iovecs | None = None  # the data as iovecs (then readable and data_out are empty)

    @property
    def parallel(self) -> bool:
        """A read or write large enough to be worth running off the worker thread."""
        return (self.kind == T_IN and self.lengths[1] >= PARALLEL_BYTES) or \
            (self.kind == T_OUT and self.lengths[0] >= PARALLEL_BYTES)


class BlkDevice(VirtioDevice):
    device_id = ID_BLOCK
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE,)
    name = "blk"

    def __init__(self, backend: BlockBackend, serial: str = "", queues: int = 1) -> None:
        self.backend = backend
        self.serial = serial.encode()[:SERIAL_LENGTH]
        self._io_errors_logged = False
        self._pool: ThreadPoolExecutor | None = None  # made on the first batch that needs it
        self.pool_threads = min(POOL_THREADS, spare_cpus(queues))  # 0: no pool
        self.set_queues(queues)

    def set_queues(self, count: int) -> None:
        """Request queues (before the transport is built); more than one offers F_MQ."""
        if not 1 <= count <= MAX_QUEUES:
            raise ValueError(f"virtio-blk: {count} queues is out of range 1..{MAX_QUEUES}")
        self.queue_sizes = (QUEUE_SIZE,) * count

    def fit_machine(self, cpus: int) -> None:
        self.set_queues(max(1, min(cpus, MAX_QUEUES)))
        self.pool_threads = min(POOL_THREADS, spare_cpus(cpus))

    @property
    def read_only(self) -> bool:
        return self.backend.read_only

    @property
    def features(self) -> int:
        bits = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | (F_MQ if len(self.queue_sizes) > 1 else 0)
        return bits | F_RO if self.read_only else bits | F_DISCARD | F_WRITE_ZEROES

    def config_bytes(self) -> bytes:
        capacity = self.backend.size // SECTOR
        granularity = max(self.backend.discard_granularity // SECTOR, 1)
        return struct.pack(
            "<QII" "HBB" "I" "BBHI" "BBH" "III" "II" "B3x",
            capacity, SIZE_MAX, SEG_MAX,
            0, 0, 0,  # geometry: not offered
            SECTOR,  # blk_size
            0, 0, 0, 0,  # topology: not offered
            0, 0, len(self.queue_sizes),  # writeback, unused, num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, granularity,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS,
            1,  # write_zeroes_may_unmap
        )

    def process(self, index: int, queue: Virtqueue, ctx: QueueContext) -> None:
        """Serve every available request of the queue as one batch (see the module doc)."""
        chains = list(queue.drain())
        if not chains:
            return
        if len(chains) == 1:
            ctx.complete(queue, chains[0], self.handle(chains[0], ctx))
            return
        requests = [self.parse(chain, ctx) for chain in chains]  # a bad one resets the device
        done: list[tuple[int, int]] = []
        in_flight: list[tuple[int, Future[int]]] = []
        parallel = sum(request.parallel for request in requests) if self.pool_threads else 0
        try:
            for chain, request in zip(chains, requests):
                if parallel > 1 and request.parallel:
                    parallel -= 1  # the last one runs here, on the worker, while the pool works
                    in_flight.append((chain.head, self._executor().submit(self.execute, request)))
                    continue
                if request.kind not in (T_IN, T_OUT):
                    # A flush (or discard...) covers the writes completed before it: finish them.
                    done += [(head, future.result()) for head, future in in_flight]
                    in_flight.clear()
                done.append((chain.head, self.execute(request)))
            done += [(head, future.result()) for head, future in in_flight]
        finally:
            for _, future in in_flight:  # on an error: nothing may still write guest memory
                future.exception()
        if ctx.complete_many is not None:
            ctx.complete_many(queue, done)
        else:
            for chain, (_, written) in zip(chains, done):
                ctx.complete(queue, chain, written)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.pool_threads, thread_name_prefix="virtio-blk-io")
        return self._pool

    def handle(self, chain: DescriptorChain, ctx: QueueContext) -> int:
        """Serve one request; returns the bytes written into the chain (data + status)."""
        return self.execute(self.parse(chain, ctx))

    def parse(self, chain: DescriptorChain, ctx: QueueContext) -> BlkRequest:
        """The request a chain carries; DeviceError when its framing is broken."""
        if chain.table is not None:
            request = _parse_table(chain, chain.table, ctx.memory)
            if request is not None:
                return request
        header_views, readable = split_front(chain.readable_views(ctx.memory), _HEADER.size)
        data_out, status_views = split_back(chain.writable_views(ctx.memory), 1)
        header = b"".join(header_views)
        if len(header) < _HEADER.size:
            raise DeviceError(f"request header is {len(header)} bytes, not {_HEADER.size}")
        if not status_views:
            raise DeviceError("request has no device-writable status byte")
        kind, _, sector = _HEADER.unpack(header)
        # Lengths from the chain's ranges (one C-level sum), not from the views one by one.
        lengths = (chain.readable_length - _HEADER.size, chain.writable_length - 1)
        return BlkRequest(kind, sector, readable, data_out, status_views[0], lengths)

    def execute(self, request: BlkRequest) -> int:
        """Do the request and write its status byte; returns the bytes written into the chain."""
        written = 0
        try:
            status, written = self._serve(request.kind, request.sector, request.readable, request.data_out,
                                          request.lengths, request.iovecs)
        except DiskError as error:
            if not self._io_errors_logged:
                log.warning("virtio-blk %s: I/O error (further ones not logged): %s", self.backend.path, error)
                self._io_errors_logged = True
            status = S_IOERR
        request.status[0] = status
        return written + 1

    def _serve(self, kind: int, sector: int, readable: list[memoryview], data_out: list[memoryview],
               lengths: tuple[int, int], iovecs: Iovecs | None = None) -> tuple[int, int]:
        if (kind == T_IN and lengths[0]) or (kind == T_OUT and lengths[1]):
            return S_IOERR, 0  # data buffers in the wrong direction: nothing is transferred
        if kind == T_IN:
            length = lengths[1]
            if not self._in_range(sector, length):
                return S_IOERR, 0
            if iovecs is not None:
                self.backend.readinto_iovecs(sector * SECTOR, iovecs)
            else:
                self.backend.readinto(sector * SECTOR, ByteViews(data_out, length))
            return S_OK, length
        if kind == T_OUT:
            length = lengths[0]
            if self.read_only or not self._in_range(sector, length):
                return S_IOERR, 0
            if iovecs is not None:
                self.backend.write_iovecs(sector * SECTOR, iovecs)
            else:
                self.backend.write(sector * SECTOR, ByteViews(readable, length))
            return S_OK, 0
        if kind == T_FLUSH:
            self.backend.flush()
            return S_OK, 0
        if kind == T_GET_ID:
            serial = self.serial.ljust(SERIAL_LENGTH, b"\0")
            done = 0
            for view in data_out:
                count = min(view.nbytes, SERIAL_LENGTH - done)
                view[:count] = serial[done : done + count]
                done += count
            return S_OK, done
        if kind in (T_DISCARD, T_WRITE_ZEROES):
            if self.read_only:
                return S_IOERR, 0
            return self._ranges(kind, b"".join(bytes(v) for v in readable)), 0
        return S_UNSUPP, 0

    def _ranges(self, kind: int, payload: bytes) -> int:
        if not payload or len(payload) % _SEGMENT.size or len(payload) // _SEGMENT.size > MAX_DISCARD_SEGMENTS:
            return S_IOERR
        segments = [_SEGMENT.unpack_from(payload, i) for i in range(0, len(payload), _SEGMENT.size)]
        for sector, count, flags in segments:
            if not self._in_range(sector, count * SECTOR) or flags & ~SEGMENT_F_UNMAP:
                return S_UNSUPP if flags & ~SEGMENT_F_UNMAP else S_IOERR
        for sector, count, _ in segments:
            if kind == T_DISCARD:
                self.backend.discard(sector * SECTOR, count * SECTOR)
            else:
                self.backend.write_zeroes(sector * SECTOR, count * SECTOR)
        return S_OK

    def _in_range(self, sector: int, length: int) -> bool:
        return length % SECTOR == 0 and sector * SECTOR + length <= self.backend.size

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # no request may touch the backend after this
            self._pool = None
        self.backend.close()


def _parse_table(chain: DescriptorChain, table: bytes, memory: GuestMemory) -> BlkRequest | None:
    """A read or write as Linux sends it, one indirect table (checked by the walk: plain, in
    one RAM region) of header, data pages, status byte: its data entries become the iovecs
    themselves. None for any other shape (the general parse then handles it)."""
    region, count, split = chain.region, len(table) // 16, chain.split
    if region is None or count < 3:
        return None
    header_address, header_length = _ENTRY.unpack_from(table, 0)
    status_address, status_length = _ENTRY.unpack_from(table, len(table) - 16)
    if header_length != _HEADER.size or status_length != 1:
        return None
    base, view = region.guest_address, region.view
    kind, _, sector = _HEADER.unpack_from(view, header_address - base)
    if not ((kind == T_IN and split == 1) or (kind == T_OUT and split == count - 1)):
        return None
    data = table[16:-16]
    packed = _as_iovecs(data, region.host_address - base)
    if packed is None:
        return None
    nbytes = sum(array("I", data)[2::4])
    status = view[status_address - base : status_address - base + 1]
    if kind == T_IN:
        iovecs = Iovecs(packed, nbytes, lambda: split_back(chain.writable_views(memory), 1)[0])
        return BlkRequest(kind, sector, [], [], status, (0, nbytes), iovecs)
    iovecs = Iovecs(packed, nbytes, lambda: split_front(chain.readable_views(memory), _HEADER.size)[1])
    return BlkRequest(kind, sector, [], [], status, (nbytes, 0), iovecs)


_LANES: dict[tuple[int, int], tuple[int, int]] = {}


def _as_iovecs(entries: bytes, delta: int) -> bytes | None:
    """Descriptors (address u64, len u32, flags u16, next u16) -> `struct iovec` (base u64,
    len u64), all entries at once: read as one integer, each entry's flags and next are masked
    off and `delta` (guest -> host address) added to each address. No carry crosses from one
    field to the next: the addresses were checked to lie in guest RAM, mapped far below 2**64."""
    if delta < 0:
        return None
    count = len(entries) // 16
    lanes = _LANES.get((count, delta))
    if lanes is None:
        if len(_LANES) > 256:
            _LANES.clear()
        mask = int.from_bytes((b"\xff" * 12 + bytes(4)) * count, "little")
        add = int.from_bytes((delta.to_bytes(8, "little") + bytes(8)) * count, "little")
        lanes = _LANES[(count, delta)] = (mask, add)
    return ((int.from_bytes(entries, "little") & lanes[0]) + lanes[1]).to_bytes(len(entries), "little")


def open_block_device(path: str, read_only: bool = False, serial: str | None = None) -> BlkDevice:
    """A virtio-blk device over a raw or qcow2 image (format probed from the file)."""
    backend = open_disk(str(path), read_only=read_only)
    return BlkDevice(backend, serial if serial is not None else _default_serial(str(path)))


def _default_serial(path: str) -> str:
    return os.path.basename(path)[:SERIAL_LENGTH]
