"""Split virtqueues (VIRTIO 1.x, 2.7): descriptor chains, available and used rings, EVENT_IDX.

Everything the guest wrote is untrusted. Every ring and buffer address goes through
`GuestMemory` (so nothing outside guest RAM is ever touched) and every chain is checked for
loops, excessive length, bad indexes and misplaced flags before a device sees it. Any of
those raises `QueueError`; the transport then puts the device into DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import struct
import sys
import threading
from array import array
from dataclasses import dataclass
from operator import add, eq, itemgetter
from typing import Iterator

from ..errors import GuestMemoryError
from ..memory import GuestMemory, MemoryRegion

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
_LENGTH = itemgetter(1)
_FENCE = threading.Lock()
_LITTLE_ENDIAN = sys.byteorder == "little"  # virtio rings are little-endian; array() is native


def _full_barrier() -> None:
    """A store-load barrier: taking a lock is an atomic read-modify-write (a locked
    instruction on x86), so our ring write is visible before the ring read that follows,
    as the spec asks between publishing avail_event and re-reading avail->idx."""
    _FENCE.acquire()
    _FENCE.release()


class QueueError(Exception):
    """The guest broke the virtqueue rules; the device must stop using the queue."""


@dataclass(frozen=True, slots=True)
class Buffer:
    """One guest buffer of a chain: a guest-physical range already checked against RAM.
    Descriptors that are contiguous in guest memory are merged into one Buffer."""

    address: int
    length: int


class DescriptorChain:
    """A request: device-readable buffers first, then device-writable ones (spec 2.7.4.2).

    The ranges are plain (address, length) tuples, checked against guest RAM when the chain
    was walked; `region` is the one RAM region that holds all of them (None when they span
    several), so the views are slices of one memoryview with no lookup per buffer."""

    __slots__ = ("head", "_readable", "_writable", "region", "table", "split")

    def __init__(self, head: int, readable_ranges: list[tuple[int, int]] | None = None,
                 writable_ranges: list[tuple[int, int]] | None = None, region: MemoryRegion | None = None) -> None:
        self.head = head
        self._readable = readable_ranges if readable_ranges is not None else []
        self._writable = writable_ranges if writable_ranges is not None else []
        self.region = region
        # A plain indirect table in one region (the fast walk): its bytes, and how many of
        # its entries are device-readable. The ranges are then made only when asked for, so
        # a device that can use the table as it is (virtio-blk on a raw file) never makes a
        # Python object per guest page.
        self.table: bytes | None = None
        self.split = 0

    def _unpack_table(self) -> None:
        table, split = self.table, self.split
        assert table is not None
        flat = _table_layout(len(table) // DESC_SIZE)[0].unpack(table)
        addresses, lengths = flat[0::4], flat[1::4]
        self._readable = _merge(addresses[:split], lengths[:split])
        self._writable = _merge(addresses[split:], lengths[split:])
        self.table = None

    @property
    def readable_ranges(self) -> list[tuple[int, int]]:
        if self.table is not None:
            self._unpack_table()
        return self._readable

    @readable_ranges.setter
    def readable_ranges(self, ranges: list[tuple[int, int]]) -> None:
        if self.table is not None:
            self._unpack_table()
        self._readable = ranges

    @property
    def writable_ranges(self) -> list[tuple[int, int]]:
        if self.table is not None:
            self._unpack_table()
        return self._writable

    @writable_ranges.setter
    def writable_ranges(self, ranges: list[tuple[int, int]]) -> None:
        if self.table is not None:
            self._unpack_table()
        self._writable = ranges

    @property
    def readable(self) -> list[Buffer]:
        return [Buffer(address, length) for address, length in self.readable_ranges]

    @property
    def writable(self) -> list[Buffer]:
        return [Buffer(address, length) for address, length in self.writable_ranges]

    @property
    def readable_length(self) -> int:
        if self.table is not None:
            return sum(_table_lengths(self.table)[: self.split])
        return sum(map(_LENGTH, self.readable_ranges))

    @property
    def writable_length(self) -> int:
        if self.table is not None:
            return sum(_table_lengths(self.table)[self.split :])
        return sum(map(_LENGTH, self.writable_ranges))

    def _views(self, ranges: list[tuple[int, int]], memory: GuestMemory) -> list[memoryview]:
        region = self.region
        if region is None:
            return [memory.view(address, length) for address, length in ranges if length]
        base, view = region.guest_address, region.view
        return [view[address - base : address - base + length] for address, length in ranges if length]

    def readable_views(self, memory: GuestMemory) -> list[memoryview]:
        return self._views(self.readable_ranges, memory)

    def writable_views(self, memory: GuestMemory) -> list[memoryview]:
        return self._views(self.writable_ranges, memory)

    def read_readable(self, memory: GuestMemory, offset: int = 0, length: int | None = None) -> bytes:
        """Copy `length` bytes (default: all) of the readable part, starting at `offset`."""
        views = self.readable_views(memory)
        total = sum(v.nbytes for v in views)
        end = total if length is None else min(total, offset + length)
        return b"".join(bytes(v) for v in slice_views(views, offset, max(end - offset, 0)))

    def write_writable(self, memory: GuestMemory, data: bytes | memoryview, offset: int = 0) -> int:
        """Scatter `data` into the writable part from `offset`; returns bytes written."""
        views = self.writable_views(memory)
        if offset == 0 and len(views) == 1:  # the common case: one guest buffer
            count = min(len(data), views[0].nbytes)
            views[0][:count] = data[:count]
            return count
        done = 0
        for view in slice_views(views, offset, len(data)):
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


def _merge(addresses: tuple[int, ...], lengths: tuple[int, ...]) -> list[tuple[int, int]]:
    """(address, length) ranges, buffers that continue the previous one merged into it."""
    ranges = list(zip(addresses, lengths))
    # A C-level scan first: most chains have no contiguous neighbours and skip the loop.
    if len(ranges) < 2 or not any(map(eq, addresses[1:], map(add, addresses, lengths))):
        return ranges
    merged = [ranges[0]]
    for address, length in ranges[1:]:
        last_address, last_length = merged[-1]
        if last_address + last_length == address:
            merged[-1] = (last_address, last_length + length)
        else:
            merged.append((address, length))
    return merged


_TABLE_STRUCTS: dict[int, struct.Struct] = {}
_NEXT_SEQUENCES: dict[int, tuple[int, ...]] = {}


def _table_layout(count: int) -> tuple[struct.Struct, tuple[int, ...]]:
    """The struct for a whole table of `count` descriptors, and the `next` fields a plain
    sequential table has (1, 2, ..., count-1): how Linux always builds indirect tables."""
    layout = _TABLE_STRUCTS.get(count)
    if layout is None:
        layout = _TABLE_STRUCTS[count] = struct.Struct("<" + "QIHH" * count)
        _NEXT_SEQUENCES[count] = tuple(range(1, count))
    return layout, _NEXT_SEQUENCES[count]


_NEXT_BYTES: dict[int, tuple[bytes, bytes]] = {}


def _next_bytes(count: int) -> tuple[bytes, bytes]:
    """The low and high bytes of the `next` fields 1, 2, ..., count-1 of a sequential table."""
    columns = _NEXT_BYTES.get(count)
    if columns is None:
        columns = _NEXT_BYTES[count] = (bytes(i & 0xFF for i in range(1, count)), bytes(i >> 8 for i in range(1, count)))
    return columns


def _table_lengths(table: bytes) -> array[int]:
    """The 32-bit `len` fields of a descriptor table, one C-level copy."""
    return array("I", table)[2::4]


@dataclass
class QueueState:
    """A virtqueue as the driver set it up, and how far the device got (snapshots)."""

    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    event_idx: bool
    indirect: bool
    last_avail: int  # the next available-ring slot the device takes
    next_used: int  # the used index the device publishes next (== used->idx in guest RAM)
    signalled_used: int | None


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
        self._region: MemoryRegion | None = None  # the RAM region that held the last buffer checked
        # Views of the three areas, made once at QueueReady (their ranges are checked then):
        # ring accesses are then plain indexing, with no region lookup per access.
        self._desc = memoryview(b"")
        self._avail = memoryview(b"").cast("H")  # flags, idx, ring[size], used_event
        self._used = memoryview(b"")  # bytes: flags, idx, ring[size] of (id, len), avail_event
        self._used16 = memoryview(b"").cast("H")

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
        # The device writes the used ring: over the descriptors or the available ring it
        # would rewrite the driver's requests (a broken driver, or one probing the device).
        for name, address, length, _ in areas[:2]:
            if address < self.used_ring + 6 + 8 * size and self.used_ring < address + length:
                raise QueueError(f"used ring 0x{self.used_ring:x}+{6 + 8 * size} overlaps the {name}")
        self._desc = self.memory.view(self.desc_table, DESC_SIZE * size)
        self._avail = self.memory.view(self.avail_ring, 6 + 2 * size).cast("H")
        self._used = self.memory.view(self.used_ring, 6 + 8 * size)
        self._used16 = self._used.cast("H")
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = 0
        self.next_used = 0
        self.signalled_used = None
        self.ready = True

    # --- snapshots -------------------------------------------------------------------------
    def save_state(self, unconsumed: int = 0) -> QueueState:
        """`unconsumed`: chains the device took but has not completed (a held RX buffer); the
        saved state gives them back to the ring, so a restored device takes them again."""
        return QueueState(self.size, self.ready, self.desc_table, self.avail_ring, self.used_ring, self.event_idx,
                          self.indirect, (self.last_avail - unconsumed) & 0xFFFF, self.next_used, self.signalled_used)

    def restore_state(self, state: QueueState) -> None:
        """Set the queue up as saved, checking the rings against guest RAM (QueueError)."""
        self.reset()
        self.size, self.desc_table, self.avail_ring, self.used_ring = state.size, state.desc_table, \
            state.avail_ring, state.used_ring
        if not state.ready:
            return
        self.activate(state.event_idx, state.indirect)
        for name in ("last_avail", "next_used"):
            if not 0 <= getattr(state, name) <= 0xFFFF:
                raise QueueError(f"{name} {getattr(state, name)} is not a 16-bit index")
        self.last_avail, self.next_used = state.last_avail, state.next_used
        self.signalled_used = state.signalled_used
        self.pending()  # raises when the saved index is more than a ring ahead of the driver's

    def sync_from_ring(self, last_avail: int) -> None:
        """Take the queue back from a device that served it elsewhere (vhost): the kernel
        reports where it stopped reading; where it stopped writing is in used->idx."""
        self.last_avail = last_avail & 0xFFFF
        self.next_used = self._used16[1]
        self.signalled_used = None

    # --- available ring --------------------------------------------------------------------
    def avail_idx(self) -> int:
        return self._avail[1]

    def pending(self) -> int:
        """How many chains the driver made available that the device has not taken."""
        count = (self._avail[1] - self.last_avail) & 0xFFFF
        if count > self.size:
            raise QueueError(f"available index moved {count} entries ahead of a queue of {self.size}")
        return count

    def pop(self) -> DescriptorChain | None:
        """The next available chain, walked and validated, or None when the ring is empty."""
        if not self.ready or self.pending() == 0:
            return None
        head = self._avail[2 + self.last_avail % self.size]
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
        address, length, flags, _ = _DESC.unpack_from(self._desc, DESC_SIZE * head)
        region = self._region
        if not flags & ~DESC_F_WRITE and region is not None and region.guest_address <= address \
                and address + length <= region.end:
            # One plain descriptor in the region of the last buffer (net RX buffers, rng).
            if flags:
                return DescriptorChain(head, [], [(address, length)], region)
            return DescriptorChain(head, [(address, length)], [], region)
        chain = DescriptorChain(head)
        index = head
        for _ in range(self.size):  # a chain visits each descriptor at most once
            address, length, flags, nxt = _DESC.unpack_from(self._desc, DESC_SIZE * index)
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise QueueError("indirect descriptor but VIRTIO_F_INDIRECT_DESC was not negotiated")
                if flags & DESC_F_NEXT:
                    raise QueueError("descriptor has both INDIRECT and NEXT")
                if chain.readable_ranges or chain.writable_ranges:
                    # Direct descriptors before the table: legal but unusual, the general walk.
                    self._walk_indirect_slow(chain, address, length)
                else:
                    self._walk_indirect(chain, address, length)
                return chain
            self._add(chain, address, length, flags)
            if not flags & DESC_F_NEXT:
                return chain
            if nxt >= self.size:
                raise QueueError(f"descriptor {index} links to {nxt}, outside a queue of {self.size}")
            index = nxt
        raise QueueError(f"descriptor chain from {head} loops or is longer than the queue ({self.size})")

    def _table(self, table: int, length: int) -> tuple[int, bytes]:
        """(count, bytes) of an indirect table, after its framing checks."""
        if length == 0 or length % DESC_SIZE:
            raise QueueError(f"indirect table length {length} is not a non-zero multiple of 16")
        count = length // DESC_SIZE
        if count > MAX_INDIRECT:
            raise QueueError(f"indirect table of {count} descriptors exceeds {MAX_INDIRECT}")
        try:
            entries = self.memory.view(table, length)  # one lookup for the whole table
        except GuestMemoryError:
            raise QueueError(f"indirect table 0x{table:x}+{length} is outside guest RAM") from None
        # One copy: the driver may rewrite its table while we read it; we act on one version.
        return count, bytes(entries)

    def _walk_indirect(self, chain: DescriptorChain, table: int, length: int) -> None:
        """The fast path for the tables drivers really build: entries linked in order, the
        readable ones first, all in one RAM region. It checks exactly what the slow path
        checks, with C-level operations over the table's byte columns (no Python object per
        entry); anything else takes the slow path."""
        count, raw = self._table(table, length)
        flags = raw[12::16]
        body, last = flags[:-1], flags[-1:]
        readable = len(body) - len(body.lstrip(b"\x01"))  # NEXT-only entries lead...
        next_low, next_high = _next_bytes(count)
        plain = (
            _LITTLE_ENDIAN
            and not raw[13::16].strip(b"\0")  # every flags word below 256
            and not body[readable:].lstrip(b"\x03")  # ...then NEXT|WRITE ones
            and (last == b"\x02" or (last == b"\x00" and readable == len(body)))  # the end: no NEXT
            and raw[14::16][:-1] == next_low and raw[15::16][:-1] == next_high  # entry i links to i + 1
        )
        if plain:
            # Bounds from the columns' extremes: max(address) + max(len) is at least the true
            # end, so a table near a region's end may take the exact slow path; never the reverse.
            low = min(array("Q", raw)[0::2])
            high = max(array("Q", raw)[0::2]) + max(_table_lengths(raw))
            region = self._region
            if region is None or not (region.guest_address <= low and high <= region.end):
                try:
                    region = self._region = self.memory.region_of(low, high - low)
                except GuestMemoryError:
                    region = None  # spans regions (or leaves RAM): checked buffer by buffer
            if region is not None:
                chain.table, chain.split, chain.region = raw, count if last == b"\x00" else readable, region
                return
        flat = _table_layout(count)[0].unpack(raw)  # one C-level pass
        self._walk_entries(chain, count, list(zip(*[iter(flat)] * 4)))

    def _walk_indirect_slow(self, chain: DescriptorChain, table: int, length: int) -> None:
        count, raw = self._table(table, length)
        flat = _table_layout(count)[0].unpack(raw)
        self._walk_entries(chain, count, list(zip(*[iter(flat)] * 4)))

    def _walk_entries(self, chain: DescriptorChain, count: int, entries: list[tuple[int, int, int, int]]) -> None:
        index = 0
        for _ in range(count):
            address, size, flags, nxt = entries[index]
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
        region = self._region
        if region is None or not (region.guest_address <= address and address + length <= region.end):
            try:
                region = self._region = self.memory.region_of(address, length)
            except GuestMemoryError:
                raise QueueError(f"buffer 0x{address:x}+{length} is outside guest RAM") from None
        if not chain.readable_ranges and not chain.writable_ranges:
            chain.region = region
        elif chain.region is not region:
            chain.region = None  # buffers in several regions: views are looked up one by one
        if flags & DESC_F_WRITE:
            target = chain.writable_ranges
        elif chain.writable_ranges:
            raise QueueError("device-readable descriptor after a device-writable one")
        else:
            target = chain.readable_ranges
        # Buffers that continue the previous one in the same region become one iovec.
        if target and (last := target[-1])[0] + last[1] == address and last[0] >= region.guest_address:
            target[-1] = (last[0], last[1] + length)
        else:
            target.append((address, length))

    # --- used ring -------------------------------------------------------------------------
    def add_used(self, head: int, written: int) -> None:
        """Return a chain to the driver: the element first, then the index that publishes it."""
        if not self.ready:
            raise QueueError("used buffer on a queue that is not ready")
        _USED_ELEM.pack_into(self._used, 4 + 8 * (self.next_used % self.size), head, written)
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._used16[1] = self.next_used

    def add_used_many(self, entries: list[tuple[int, int]]) -> None:
        """Return several chains: every element first, then one index update for all."""
        if not self.ready:
            raise QueueError("used buffer on a queue that is not ready")
        index, size, used = self.next_used, self.size, self._used
        for head, written in entries:
            _USED_ELEM.pack_into(used, 4 + 8 * (index % size), head, written)
            index = (index + 1) & 0xFFFF
        self.next_used = index
        self._used16[1] = index

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added since the last one."""
        if self.event_idx:
            old = self.signalled_used
            new = self.next_used
            self.signalled_used = new
            if old is None:
                return True
            return need_event(self._avail[2 + self.size], new, old)  # used_event
        return not self._avail[0] & AVAIL_F_NO_INTERRUPT

    def set_notification(self, enable: bool) -> None:
        """Ask the driver to kick (or not) for new buffers. With EVENT_IDX the device names the
        avail index it wants a kick for; otherwise it sets or clears USED_F_NO_NOTIFY."""
        if not self.ready:
            return
        if self.event_idx:
            if enable:
                self._used16[2 + 4 * self.size] = self.last_avail  # avail_event
        else:
            self._used16[0] = 0 if enable else USED_F_NO_NOTIFY
        if enable:
            _full_barrier()  # the caller re-reads avail->idx next

    def kick_on_next(self) -> int:
        """Ask for a kick when the driver adds its next buffer, though buffers it already
        posted are still unused (a device waiting for more room than the ring holds, e.g. a
        large RX frame). Returns the avail index seen: if it moved, buffers were added
        meanwhile and no kick may come for them."""
        if not self.ready:
            return 0
        seen = self._avail[1]
        if self.event_idx:
            self._used16[2 + 4 * self.size] = seen  # avail_event: the slot it fills next
        else:
            self._used16[0] = 0
        _full_barrier()
        return seen
