"""Refcount blocks of any width (1..64 bits), the refcount table, and cluster allocation.

Allocation writes nothing by itself: increments live in cached refcount blocks until the
image flushes them (before any L2 table that points at the new clusters). Decrements are
deferred until the L2/L1 tables that stopped referencing a cluster are on disk, so a freed
cluster can never be reused while a stale on-disk table still points at it.
"""

from __future__ import annotations

import dataclasses
import sys
from array import array
from typing import TYPE_CHECKING

from ..block_backend import DiskFormatError
from . import constants as C
from . import overlap as ol
from .tables import TableCache, decode_u64, encode_u64

if TYPE_CHECKING:
    from .image import Qcow2Image

_TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}


class RefcountBlock:
    """One refcount block cluster; entries are unsigned, big-endian, LSB-first below 8 bits."""

    def __init__(self, order: int, data: bytes | bytearray) -> None:
        self.order = order
        self.entries = len(data) * 8 >> order
        self.max = (1 << (1 << order)) - 1
        if order >= 3:
            self._array = array(_TYPECODES[order])
            self._array.frombytes(data)
            if order > 3 and sys.byteorder == "little":
                self._array.byteswap()
            self._bits: bytearray | None = None
        else:
            self._bits = bytearray(data)

    def get(self, index: int) -> int:
        if self._bits is None:
            return self._array[index]
        width = 1 << self.order
        bit = index * width
        return (self._bits[bit >> 3] >> (bit & 7)) & self.max

    def set(self, index: int, value: int) -> None:
        if self._bits is None:
            self._array[index] = value
            return
        width = 1 << self.order
        bit = index * width
        byte = self._bits[bit >> 3] & ~(self.max << (bit & 7))
        self._bits[bit >> 3] = byte | (value << (bit & 7))

    def first_zero(self, start: int) -> int:
        """Index of the first zero entry at or after `start`, or -1."""
        if self._bits is None:
            try:
                return self._array.index(0, start)
            except ValueError:
                return -1
        for index in range(start, self.entries):
            if self.get(index) == 0:
                return index
        return -1

    def nonzero(self) -> list[tuple[int, int]]:
        if self._bits is None:
            arr = self._array
            return [(i, arr[i]) for i in range(len(arr)) if arr[i]] if any(arr) else []
        return [(i, v) for i in range(self.entries) if (v := self.get(i))]

    def encode(self) -> bytes:
        if self._bits is not None:
            return bytes(self._bits)
        if self.order > 3 and sys.byteorder == "little":
            copy = array(self._array.typecode, self._array)
            copy.byteswap()
            return copy.tobytes()
        return self._array.tobytes()


class Refcounts:
    """The refcount table of one open image, its cached blocks and the cluster allocator."""

    def __init__(self, image: Qcow2Image, cache_capacity: int) -> None:
        self.image = image  # Qcow2Image: file access, header, ordered flush
        header = image.header
        self.path = image.path
        self.order = header.refcount_order
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.block_entries = self.cluster_size * 8 >> self.order
        self.max = (1 << (1 << self.order)) - 1
        data = image.read_metadata(header.refcount_table_offset,
                                   header.refcount_table_clusters * self.cluster_size,
                                   "refcount_table_offset")
        self.table = decode_u64(data)
        self.table_dirty = False
        self.blocks: TableCache[RefcountBlock] = TableCache(cache_capacity, self._load_block,
                                                            image.flush_metadata)
        self.pending_free: list[int] = []  # cluster indices to decrement after the next flush
        self.free_hint = 0

    # Reading

    def block_offset(self, table_index: int) -> int:
        """Host offset of a refcount block, 0 if absent; validated as it is used."""
        if table_index >= len(self.table):
            return 0
        entry = self.table[table_index]
        offset = entry & ~C.REFTABLE_RESERVED & ((1 << 56) - 1)
        if offset == 0:
            return 0
        where = self.image.header.refcount_table_offset + 8 * table_index
        if offset & (self.cluster_size - 1):
            raise DiskFormatError(self.path, f"refcount table entry {table_index}", where,
                                  f"block offset {offset:#x} is not cluster aligned")
        if offset >= self.image.file_size:
            raise DiskFormatError(self.path, f"refcount table entry {table_index}", where,
                                  f"block offset {offset:#x} is past the end of the file")
        return offset

    def _load_block(self, offset: int) -> RefcountBlock:
        data = self.image.read_metadata(offset, self.cluster_size, "refcount block")
        return RefcountBlock(self.order, data)

    def get(self, cluster: int) -> int:
        block_offset = self.block_offset(cluster // self.block_entries)
        if not block_offset:
            return 0
        return self.blocks.get(block_offset).get(cluster % self.block_entries)

    # Changing (in memory; written by write_dirty)

    def add(self, cluster: int, delta: int) -> None:
        table_index, index = divmod(cluster, self.block_entries)
        block_offset = self.block_offset(table_index)
        if not block_offset:
            raise DiskFormatError(self.path, "refcount table", self.image.header
                                  .refcount_table_offset, f"no refcount block covers cluster "
                                  f"{cluster} (host offset {cluster << self.cluster_bits:#x})")
        block = self.blocks.get(block_offset)
        value = block.get(index) + delta
        if value < 0 or value > self.max:
            raise DiskFormatError(self.path, f"refcount of cluster {cluster}", block_offset,
                                  f"would become {value} (allowed 0..{self.max})")
        block.set(index, value)
        self.blocks.mark_dirty(block_offset)
        if value == 0 and cluster < self.free_hint:
            self.free_hint = cluster

    def set(self, cluster: int, value: int) -> None:
        """Repair: force a refcount (the block must exist)."""
        self.add(cluster, value - self.get(cluster))

    def free_later(self, cluster: int) -> None:
        self.pending_free.append(cluster)

    def apply_pending_frees(self) -> bool:
        frees, self.pending_free = self.pending_free, []
        for cluster in frees:
            self.add(cluster, -1)
        return bool(frees)

    def allocate(self, count: int = 1) -> int:
        """Host offset of `count` contiguous free clusters, now with refcount 1."""
        epb = self.block_entries
        run_start, run = self.free_hint, 0
        while run < count:
            candidate = run_start + run
            table_index, index = divmod(candidate, epb)
            if table_index >= len(self.table):
                self._grow_table(table_index)
                continue  # the new table and blocks took clusters: re-examine
            block_offset = self.block_offset(table_index)
            if not block_offset:
                self._new_block(table_index, candidate)
                run_start, run = candidate + 1, 0
                continue
            block = self.blocks.get(block_offset)
            if block.get(index) == 0:
                run += 1
                continue
            # Counts past the end of the file are leaks (QEMU ignores them): skip them,
            # but a table of absurd counts must not turn into an endless scan.
            if candidate > (self.image.file_size >> self.cluster_bits) + (1 << 22):
                raise DiskFormatError(self.path, f"refcount of cluster {candidate}",
                                      block_offset, "millions of clusters past the end of "
                                      "the file are marked in use")
            free = block.first_zero(index)
            run_start = table_index * epb + free if free >= 0 else (table_index + 1) * epb
            run = 0
        self._refuse_live(run_start, count)
        for cluster in range(run_start, run_start + count):
            self.add(cluster, 1)
        if count == 1 or self.free_hint >= run_start:
            self.free_hint = max(self.free_hint, run_start + count)
        self.image.reserve_file_end((run_start + count) << self.cluster_bits)
        return run_start << self.cluster_bits

    def _refuse_live(self, first: int, count: int) -> None:
        """A zeroed refcount (or refcount-table entry) must not hand out a cluster that still
        holds metadata: QEMU refuses such an allocation and marks the image corrupt."""
        overlap = self.image.overlap
        if overlap is None:
            return
        for cluster in range(first, first + count):
            kind = overlap.kind_of(cluster)
            if kind is not None:
                where = self.image.header.refcount_table_offset + \
                    8 * (cluster // self.block_entries)
                self.image.signal_corruption(
                    f"refcount of cluster {cluster}", where, f"is 0 although the cluster "
                    f"(host offset {cluster << self.cluster_bits:#x}) holds {kind}; refusing "
                    "to allocate it")

    def _new_block(self, table_index: int, cluster: int) -> None:
        """A self-describing block: it lives in the first free cluster of the range it covers."""
        self._refuse_live(cluster, 1)
        offset = cluster << self.cluster_bits
        if self.image.overlap is not None:
            self.image.overlap.add(offset, self.cluster_size, ol.REFBLOCK)
        block = RefcountBlock(self.order, bytes(self.cluster_size))
        block.set(cluster % self.block_entries, 1)
        self.blocks.put_new(offset, block)
        self.table[table_index] = offset
        self.table_dirty = True
        self.image.reserve_file_end(offset + self.cluster_size)

    def _grow_table(self, needed_index: int) -> None:
        """Move the refcount table to a bigger place at the end of the file.

        The new table and the blocks describing it are placed past every used cluster,
        written and synced, then the header is switched to it in one write.
        """
        image = self.image
        cs = self.cluster_size
        self.image.flush_metadata()  # start from a clean on-disk state
        start = -(-image.file_size // cs)
        entries = max(needed_index + 1, len(self.table) * 2)
        new_blocks = 0
        while True:
            table_clusters = -(-entries * 8 // cs)
            end = start + table_clusters + new_blocks
            first_block, last_block = start // self.block_entries, (end - 1) // self.block_entries
            missing = [b for b in range(first_block, last_block + 1) if not self.block_offset(b)]
            needed_entries = max(entries, last_block + 1)
            if len(missing) == new_blocks and needed_entries <= entries:
                break
            new_blocks, entries = len(missing), max(needed_entries, entries)
        if table_clusters * cs > C.MAX_REFTABLE_BYTES:
            raise DiskFormatError(self.path, "refcount_table_clusters", 56,
                                  "the refcount table would exceed QEMU's 8 MiB limit")
        image.reserve_file_end((start + table_clusters + new_blocks) * cs)
        table = array("Q", self.table)
        table.extend([0] * (table_clusters * cs // 8 - len(table)))
        # The header is encoded before anything changes: one that cannot be written (say an
        # odd header_length) must leave memory and file as they were.
        old_offset = image.header.refcount_table_offset
        old_clusters = image.header.refcount_table_clusters
        new_header = dataclasses.replace(image.header, refcount_table_offset=start * cs,
                                         refcount_table_clusters=table_clusters)
        new_header.encode(self.path)
        old_table = self.table
        overlap = image.overlap
        for n, block_index in enumerate(missing):
            offset = (start + table_clusters + n) * cs
            table[block_index] = offset
            self.blocks.put_new(offset, RefcountBlock(self.order, bytes(cs)))
            if overlap is not None:
                overlap.add(offset, cs, ol.REFBLOCK)
        if overlap is not None:
            overlap.add(start * cs, table_clusters * cs, ol.REFTABLE)
        self.table = table
        try:
            for cluster in range(start, start + table_clusters + new_blocks):
                self.add(cluster, 1)
            self.write_dirty_blocks()
            image.pwrite_all(encode_u64(table), start * cs, ol.REFTABLE)
            image.sync()
            image.write_header(new_header)
            image.sync()
        except BaseException:
            if image.header is not new_header:  # the old table is still the one on disk
                self.table = old_table
                if overlap is not None:
                    overlap.remove(start * cs, table_clusters * cs, ol.REFTABLE)
            raise
        if overlap is not None:  # the old table becomes free space, to be reused for data
            overlap.remove(old_offset, old_clusters * cs, ol.REFTABLE)
        self.table_dirty = False
        for n in range(old_clusters):
            self.free_later((old_offset >> self.cluster_bits) + n)

    # Writing

    def write_dirty_blocks(self) -> bool:
        wrote = False
        for offset, block in self.blocks.dirty_items():
            self.image.pwrite_all(block.encode(), offset, ol.REFBLOCK)
            wrote = True
        self.blocks.dirty.clear()
        return wrote

    def write_table(self) -> bool:
        if not self.table_dirty:
            return False
        header = self.image.header
        data = encode_u64(self.table)[: header.refcount_table_clusters * self.cluster_size]
        self.image.pwrite_all(data, header.refcount_table_offset, ol.REFTABLE)
        self.table_dirty = False
        return True

    def covered_clusters(self) -> int:
        return len(self.table) * self.block_entries

