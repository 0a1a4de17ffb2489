"""A minimal guest-side virtio driver, written against `GuestMemory` and the MMIO registers.

It plays the guest in unit tests (and in tools that exercise a device without a guest
kernel): it lays out a split queue, posts chains (direct or indirect), and reads the used
ring back. It trusts nothing about the device it drives.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..memory import GuestMemory
from . import mmio
from .device import F_VERSION_1
from .queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


@dataclass
class Posted:
    head: int
    writable: list[tuple[int, int]]  # (guest address, length) of each device-writable buffer


@dataclass
class QueueDriver:
    """One split queue at `base`, with a bump allocator for buffers after the rings."""

    memory: GuestMemory
    base: int
    size: int
    data_size: int = 1 << 20
    desc: int = field(init=False)
    avail: int = field(init=False)
    used: int = field(init=False)

    def __post_init__(self) -> None:
        self.desc = self.base
        self.avail = self.desc + DESC_SIZE * self.size
        self.used = _align(self.avail + 6 + 2 * self.size, 4096)
        self.data = _align(self.used + 6 + 8 * self.size, 4096)
        self.memory.fill(self.base, self.data + self.data_size - self.base)
        self._next_data = self.data
        self._next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0

    def alloc(self, length: int, content: bytes | None = None) -> int:
        address = self._next_data
        self._next_data = _align(address + max(length, 1), 16)
        if self._next_data > self.data + self.data_size:
            raise ValueError("driver data area exhausted")
        if content is not None:
            self.memory.write(address, content)
        return address

    def _descriptor(self, table: int, index: int, address: int, length: int, flags: int, nxt: int) -> None:
        self.memory.write(table + DESC_SIZE * index, struct.pack("<QIHH", address, length, flags, nxt))

    def post(self, readable: list[bytes], writable: list[int], indirect: bool = False) -> Posted:
        """Write the buffers and a chain for them, and publish it in the available ring."""
        buffers = [(self.alloc(len(data), data), len(data), 0) for data in readable]
        outs = [(self.alloc(length), length) for length in writable]
        buffers += [(address, length, DESC_F_WRITE) for address, length in outs]
        if indirect:
            table = self.alloc(DESC_SIZE * len(buffers))
            for i, (address, length, flags) in enumerate(buffers):
                last = i == len(buffers) - 1
                self._descriptor(table, i, address, length, flags | (0 if last else DESC_F_NEXT), 0 if last else i + 1)
            head = self._take_descriptors(1)[0]
            self._descriptor(self.desc, head, table, DESC_SIZE * len(buffers), DESC_F_INDIRECT, 0)
        else:
            indexes = self._take_descriptors(len(buffers))
            for i, (address, length, flags) in enumerate(buffers):
                last = i == len(buffers) - 1
                nxt = 0 if last else indexes[i + 1]
                self._descriptor(self.desc, indexes[i], address, length, flags | (0 if last else DESC_F_NEXT), nxt)
            head = indexes[0]
        self.publish(head)
        return Posted(head, outs)

    def _take_descriptors(self, count: int) -> list[int]:
        indexes = [(self._next_desc + i) % self.size for i in range(count)]
        self._next_desc = (self._next_desc + count) % self.size
        return indexes

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written length) of every used element since the last call."""
        out = []
        index = self.memory.read_u16(self.used + 2)
        while self.used_seen != index:
            slot = self.used_seen % self.size
            out.append(struct.unpack("<II", self.memory.read(self.used + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)


class MmioDriver:
    """Drives a transport's registers the way Linux's virtio_mmio driver does."""

    def __init__(self, transport: mmio.VirtioMmioTransport) -> None:
        self.transport = transport

    def read(self, offset: int) -> int:
        value: int = struct.unpack("<I", self.transport.read(offset, 4))[0]
        return value

    def write(self, offset: int, value: int) -> None:
        self.transport.write(offset, struct.pack("<I", value & 0xFFFFFFFF))

    def device_features(self) -> int:
        self.write(mmio.DEVICE_FEATURES_SEL, 0)
        low = self.read(mmio.DEVICE_FEATURES)
        self.write(mmio.DEVICE_FEATURES_SEL, 1)
        return low | self.read(mmio.DEVICE_FEATURES) << 32

    def negotiate(self, features: int | None = None) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, write features, FEATURES_OK; returns the Status read back."""
        self.write(mmio.STATUS, 0)
        self.write(mmio.STATUS, mmio.ACKNOWLEDGE)
        self.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER)
        offered = self.device_features()
        chosen = offered if features is None else features
        for select in (0, 1):
            self.write(mmio.DRIVER_FEATURES_SEL, select)
            self.write(mmio.DRIVER_FEATURES, chosen >> (32 * select))
        self.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)
        return self.read(mmio.STATUS)

    def setup_queue(self, index: int, queue: QueueDriver) -> None:
        self.write(mmio.QUEUE_SEL, index)
        self.write(mmio.QUEUE_NUM, queue.size)
        for low, value in ((mmio.QUEUE_DESC_LOW, queue.desc), (mmio.QUEUE_DRIVER_LOW, queue.avail),
                           (mmio.QUEUE_DEVICE_LOW, queue.used)):
            self.write(low, value)
            self.write(low + 4, value >> 32)
        self.write(mmio.QUEUE_READY, 1)

    def driver_ok(self) -> None:
        self.write(mmio.STATUS, self.read(mmio.STATUS) | mmio.DRIVER_OK)

    def kick(self, index: int) -> None:
        self.write(mmio.QUEUE_NOTIFY, index)


DEFAULT_FEATURES = F_VERSION_1
