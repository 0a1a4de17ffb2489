"""virtio-blk (spec 5.2): one request queue over a `BlockBackend` (raw file or qcow2).

Data moves with scatter-gather straight between the disk file and guest memory: the chain's
buffers become memoryviews of guest RAM handed to the backend's preadv/pwritev. The request
header, discard segments and status byte may be split across descriptors any way the
driver likes (the spec forbids assuming a framing).
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from ..disk.block_backend import BlockBackend, ByteViews, DiskError, open_disk
from .device import ID_BLOCK, DeviceError, QueueContext, VirtioDevice
from .queue import DescriptorChain, Virtqueue, split_back, split_front

log = logging.getLogger(__name__)

SECTOR = 512
QUEUE_SIZE = 256
SERIAL_LENGTH = 20  # VIRTIO_BLK_ID_BYTES

# Feature bits
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH = 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 9
F_DISCARD, F_WRITE_ZEROES = 1 << 13, 1 << 14

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
SEGMENT_F_UNMAP = 1


@dataclass
class BlkRequest:
    kind: int
    sector: int


class BlkDevice(VirtioDevice):
    device_id = ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)
    name = "blk"

    def __init__(self, backend: BlockBackend, serial: str = "") -> None:
        self.backend = backend
        self.serial = serial.encode()[:SERIAL_LENGTH]
        self._io_errors_logged = False

    @property
    def read_only(self) -> bool:
        return self.backend.read_only

    @property
    def features(self) -> int:
        bits = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH
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
            0, 0, 1,  # writeback, unused, num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, granularity,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS,
            1,  # write_zeroes_may_unmap
        )

    def process(self, index: int, queue: Virtqueue, ctx: QueueContext) -> None:
        for chain in queue.drain():
            ctx.complete(queue, chain, self.handle(chain, ctx))

    def handle(self, chain: DescriptorChain, ctx: QueueContext) -> int:
        """Serve one request; returns the bytes written into the chain (data + status)."""
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
        written = 0
        try:
            status, written = self._serve(kind, sector, readable, data_out, lengths)
        except DiskError as error:
            if not self._io_errors_logged:
                log.warning("virtio-blk %s: I/O error (further ones not logged): %s", self.backend.path, error)
                self._io_errors_logged = True
            status = S_IOERR
        status_views[0][0] = status
        return written + 1

    def _serve(self, kind: int, sector: int, readable: list[memoryview], data_out: list[memoryview],
               lengths: tuple[int, int]) -> tuple[int, int]:
        if kind == T_IN:
            length = lengths[1]
            if not self._in_range(sector, length):
                return S_IOERR, 0
            self.backend.readinto(sector * SECTOR, ByteViews(data_out, length))
            return S_OK, length
        if kind == T_OUT:
            length = lengths[0]
            if self.read_only or not self._in_range(sector, length):
                return S_IOERR, 0
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
        self.backend.close()


def open_block_device(path: str, read_only: bool = False, serial: str | None = None) -> BlkDevice:
    """A virtio-blk device over a raw or qcow2 image (format probed from the file)."""
    backend = open_disk(str(path), read_only=read_only)
    return BlkDevice(backend, serial if serial is not None else _default_serial(str(path)))


def _default_serial(path: str) -> str:
    return os.path.basename(path)[:SERIAL_LENGTH]
