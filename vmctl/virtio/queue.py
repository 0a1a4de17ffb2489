"""Split virtqueues (VIRTIO 1.x, 2.7): descriptor chains, available and used rings, EVENT_IDX.

Everything the guest wrote is untrusted. Every ring and buffer address goes through
`GuestMemory` (so nothing outside guest RAM is ever touched) and every chain is checked for
loops, excessive length, bad indexes and misplaced flags before a device sees it. Any of
those raises `QueueError`; the transport then puts the device into DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import GuestMemoryError
from ..memory import GuestMemory

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768  # the spec's limit for split queues
# An indirect table may be longer than the queue (Linux sizes it by the request's segments),
# but a bound keeps a hostile table from costing unbounded work per request.
MAX_INDIRECT = 1024

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class QueueError(Exception):
    """The guest broke the virtqueue rules; the device must stop using the queue."""


@dataclass(frozen=True, slots=True)
class Buffer:
    """One guest buffer of a chain: a guest-physical range already checked against RAM.
    Descriptors that are contiguous in guest memory are merged into one Buffer."""

    address: int
    length: int


@dataclass
class DescriptorChain:
    """A request: device-readable buffers first, then device-writable ones (spec 2.7.4.2)."""

    head: int
    readable: list[Buffer] = field(default_factory=list)
    writable: list[Buffer] = field(default_factory=list)

    @property
    def readable_length(self) -> int:
        return sum(b.length for b in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(b.length for b in self.writable)

    def readable_views(self, memory: GuestMemory) -> list[memoryview]:
        return [memory.view(b.address, b.length) for b in self.readable if b.length]

    def writable_views(self, memory: GuestMemory) -> list[memoryview]:
        return [memory.view(b.address, b.length) for b in self.writable if b.length]

    def read_readable(self, memory: GuestMemory, offset: int = 0, length: int | None = None) -> bytes:
        """Copy `length` bytes (default: all) of the readable part, starting at `offset`."""
        views = self.readable_views(memory)
        total = sum(v.nbytes for v in views)
        end = total if length is None else min(total, offset + length)
        return b"".join(bytes(v) for v in slice_views(views, offset, max(end - offset, 0)))

    def write_writable(self, memory: GuestMemory, data: bytes | memoryview, offset: int = 0) -> int:
        """Scatter `data` into the writable part from `offset`; returns bytes written."""
        done = 0
        for view in slice_views(self.writable_views(memory), offset, len(data)):
            view[:] = data[done : done + view.nbytes]
            done += view.nbytes
        return done


def slice_views(views: list[memoryview], start: int, length: int) -> list[memoryview]:
    """The sub-views covering bytes [start, start+length) of the views' concatenation."""
    out: list[memoryview] = []
    position, end = 0, start + length
    for view in views:
        size = view.nbytes
        if position + size > start and position < end:
            out.append(view[max(start - position, 0) : min(end - position, size)])
        position += size
        if position >= end:
            break
    return out


def split_front(views: list[memoryview], count: int) -> tuple[list[memoryview], list[memoryview]]:
    """(views of the first `count` bytes, views of the rest); touches only the views it cuts."""
    front: list[memoryview] = []
    for index, view in enumerate(views):
        if count <= 0:
            return front, views[index:]
        if view.nbytes <= count:
            front.append(view)
            count -= view.nbytes
        else:
            front.append(view[:count])
            return front, [view[count:], *views[index + 1 :]]
    return front, []


def split_back(views: list[memoryview], count: int) -> tuple[list[memoryview], list[memoryview]]:
    """(views of all but the last `count` bytes, views of the last `count` bytes)."""
    back: list[memoryview] = []
    for index in range(len(views) - 1, -1, -1):
        view = views[index]
        if count <= 0:
            return views[: index + 1], back
        if view.nbytes <= count:
            back.insert(0, view)
            count -= view.nbytes
        else:
            cut = view.nbytes - count
            back.insert(0, view[cut:])
            return [*views[:index], view[:cut]], back
    return [], back


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event: did the index move past `event` when it went from `old` to `new`?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class Virtqueue:
    """Device side of one split virtqueue. Configured by the transport, used by one worker."""

    def __init__(self, memory: GuestMemory, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.memory = memory
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.event_idx = False
        self.indirect = False
        self.last_avail = 0  # next available-ring slot the device will look at
        self.next_used = 0  # index the device writes into used->idx next
        self.signalled_used: int | None = None  # used idx at the last interrupt (EVENT_IDX)
        self._ram = (0, -1)  # the RAM region that held the last buffer checked: (start, end); none yet

    # --- setup -------------------------------------------------------------------------------
    def activate(self, event_idx: bool, indirect: bool) -> None:
        """QueueReady=1: check the driver's layout against guest RAM (raises QueueError)."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two in 1..{self.max_size}")
        areas = (
            ("descriptor table", self.desc_table, DESC_SIZE * size, 16),
            ("available ring", self.avail_ring, 6 + 2 * size, 2),
            ("used ring", self.used_ring, 6 + 8 * size, 4),
        )
        for name, address, length, align in areas:
            if address % align:
                raise QueueError(f"{name} at 0x{address:x} is not {align}-byte aligned")
            if not self.memory.contains(address, length):
                raise QueueError(f"{name} 0x{address:x}+{length} is outside guest RAM")
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = 0
        self.next_used = 0
        self.signalled_used = None
        self.ready = True

    # --- guest memory helpers (any bad address becomes a QueueError) --------------------------
    def _read_u16(self, address: int) -> int:
        try:
            return self.memory.read_u16(address)
        except GuestMemoryError as error:
            raise QueueError(str(error)) from None

    def _descriptor(self, table: int, index: int) -> tuple[int, int, int, int]:
        try:
            return _DESC.unpack(self.memory.view(table + DESC_SIZE * index, DESC_SIZE))
        except GuestMemoryError as error:
            raise QueueError(str(error)) from None

    # --- available ring --------------------------------------------------------------------
    def avail_idx(self) -> int:
        return self._read_u16(self.avail_ring + 2)

    def pending(self) -> int:
        """How many chains the driver made available that the device has not taken."""
        count = (self.avail_idx() - self.last_avail) & 0xFFFF
        if count > self.size:
            raise QueueError(f"available index moved {count} entries ahead of a queue of {self.size}")
        return count

    def pop(self) -> DescriptorChain | None:
        """The next available chain, walked and validated, or None when the ring is empty."""
        if not self.ready or self.pending() == 0:
            return None
        slot = self.last_avail % self.size
        head = self._read_u16(self.avail_ring + 4 + 2 * slot)
        chain = self.walk(head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def drain(self) -> Iterator[DescriptorChain]:
        """Every available chain, until the ring stays empty after notifications are re-enabled
        (closes the race with a driver that posts just as the device finishes)."""
        while True:
            while (chain := self.pop()) is not None:
                yield chain
            self.set_notification(True)
            if not self.ready or self.pending() == 0:
                return

    def walk(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise QueueError(f"chain head {head} is outside a queue of {self.size}")
        chain = DescriptorChain(head)
        index = head
        for _ in range(self.size):  # a chain visits each descriptor at most once
            address, length, flags, nxt = self._descriptor(self.desc_table, index)
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise QueueError("indirect descriptor but VIRTIO_F_INDIRECT_DESC was not negotiated")
                if flags & DESC_F_NEXT:
                    raise QueueError("descriptor has both INDIRECT and NEXT")
                self._walk_indirect(chain, address, length)
                return chain
            self._add(chain, address, length, flags)
            if not flags & DESC_F_NEXT:
                return chain
            if nxt >= self.size:
                raise QueueError(f"descriptor {index} links to {nxt}, outside a queue of {self.size}")
            index = nxt
        raise QueueError(f"descriptor chain from {head} loops or is longer than the queue ({self.size})")

    def _walk_indirect(self, chain: DescriptorChain, table: int, length: int) -> None:
        if length == 0 or length % DESC_SIZE:
            raise QueueError(f"indirect table length {length} is not a non-zero multiple of 16")
        count = length // DESC_SIZE
        if count > MAX_INDIRECT:
            raise QueueError(f"indirect table of {count} descriptors exceeds {MAX_INDIRECT}")
        try:
            entries = self.memory.view(table, length)  # one lookup for the whole table
        except GuestMemoryError:
            raise QueueError(f"indirect table 0x{table:x}+{length} is outside guest RAM") from None
        table_entries = list(_DESC.iter_unpack(entries))  # one C-level pass over the table
        index = 0
        for _ in range(count):
            address, size, flags, nxt = table_entries[index]
            if flags & DESC_F_INDIRECT:
                raise QueueError("indirect descriptor inside an indirect table")
            self._add(chain, address, size, flags)
            if not flags & DESC_F_NEXT:
                return
            if nxt >= count:
                raise QueueError(f"indirect descriptor {index} links to {nxt}, outside a table of {count}")
            index = nxt
        raise QueueError("indirect descriptor chain loops")

    def _add(self, chain: DescriptorChain, address: int, length: int, flags: int) -> None:
        start, end = self._ram
        if not start <= address or address + length > end:  # not in the region of the last buffer
            try:
                region = self.memory.region_of(address, length)
            except GuestMemoryError:
                raise QueueError(f"buffer 0x{address:x}+{length} is outside guest RAM") from None
            start, end = self._ram = (region.guest_address, region.end)
        if flags & DESC_F_WRITE:
            target = chain.writable
        elif chain.writable:
            raise QueueError("device-readable descriptor after a device-writable one")
        else:
            target = chain.readable
        # Buffers that continue the previous one in the same region become one iovec.
        if target and (last := target[-1]).address + last.length == address and last.address >= start:
            target[-1] = Buffer(last.address, last.length + length)
        else:
            target.append(Buffer(address, length))

    # --- used ring -------------------------------------------------------------------------
    def add_used(self, head: int, written: int) -> None:
        """Return a chain to the driver: the element first, then the index that publishes it."""
        slot = self.next_used % self.size
        try:
            _USED_ELEM.pack_into(self.memory.view(self.used_ring + 4 + 8 * slot, 8), 0, head, written)
            self.next_used = (self.next_used + 1) & 0xFFFF
            self.memory.write_u16(self.used_ring + 2, self.next_used)
        except GuestMemoryError as error:
            raise QueueError(str(error)) from None

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added since the last one."""
        if self.event_idx:
            old = self.signalled_used
            new = self.next_used
            self.signalled_used = new
            if old is None:
                return True
            used_event = self._read_u16(self.avail_ring + 4 + 2 * self.size)
            return need_event(used_event, new, old)
        return not self._read_u16(self.avail_ring) & AVAIL_F_NO_INTERRUPT

    def set_notification(self, enable: bool) -> None:
        """Ask the driver to kick (or not) for new buffers. With EVENT_IDX the device names the
        avail index it wants a kick for; otherwise it sets or clears USED_F_NO_NOTIFY."""
        try:
            if self.event_idx:
                if enable:
                    self.memory.write_u16(self.used_ring + 4 + 8 * self.size, self.last_avail)
            else:
                self.memory.write_u16(self.used_ring, 0 if enable else USED_F_NO_NOTIFY)
        except GuestMemoryError as error:
            raise QueueError(str(error)) from None
