"""An open qcow2 image: reads through the backing chain, copy-on-write writes, ordered flush.

Crash consistency (see docs/qcow2.md): metadata is only changed in memory between flushes.
A flush writes, with an fdatasync after each step that has something to write:
  1. guest data and refcount increments (new clusters, new refcount blocks),
  2. the refcount table, if a new block was hooked in,
  3. L2 tables, 4. L1 entries,
  5. refcount decrements of clusters that no table on disk references any more.
So a table on disk never points at a cluster whose data or refcount is not on disk, and a
crash can at worst leak clusters (refcount > references), which `check --repair` frees.
A cluster freed by a discard is not reused before step 5, so stale on-disk L2 entries never
see another guest offset's data.
"""

from __future__ import annotations

import os
import threading
import zlib
from array import array
from typing import Any, Callable, NoReturn, Sequence

from .. import image_lock as lock_mod
from ..block_backend import (
    BlockBackend,
    DiskError,
    DiskFormatError,
    ImageCorruptError,
    UnsupportedFeatureError,
    as_bytes_views,
    chunks,
    slice_buffers,
    total_length,
)
from . import constants as C
from . import header as header_mod
from . import overlap as ol
from .refcounts import Refcounts
from .tables import TableCache, decode_u64, encode_u64

UNALLOCATED, ZERO, DATA, COMPRESSED = range(4)
_ZEROS = memoryview(bytes(1 << 21))
DEFAULT_L2_CACHE_BYTES = 32 << 20
DEFAULT_REFCOUNT_CACHE_BYTES = 4 << 20
# Remembered cluster mappings (~100 bytes each): 16 Ki of them cover 1 GiB of 64 KiB
# clusters and cost at most ~1.5 MiB of VMM memory.
DATA_MAP_ENTRIES = 1 << 14


def zero_fill(views: Sequence[memoryview]) -> None:
    for view in views:
        size = view.nbytes
        for start in range(0, size, len(_ZEROS)):
            stop = min(size, start + len(_ZEROS))
            view[start:stop] = _ZEROS[: stop - start]


class Qcow2Image(BlockBackend):
    """One qcow2 file (plus its backing chain) as a BlockBackend."""

    def __init__(self, path: str, *, read_only: bool = True, lock: bool = True,
                 open_backing: bool = True, l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
                 repair: bool = False, _chain: tuple[str, ...] = ()) -> None:
        self.path = path
        self._repair = repair  # `check --repair`: open corrupt images, skip entry validation
        self._l2_cache_bytes = l2_cache_bytes
        self._read_only = read_only
        self._mutex = threading.RLock()
        self._closed = False
        self._poisoned: str | None = None
        self.backing: BlockBackend | None = None
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as error:
            raise DiskError(f"{path}: cannot open: {error.strerror}") from None
        try:
            if lock:
                mode = lock_mod.READER if read_only else lock_mod.WRITER
                lock_mod.acquire(self.fd, path, mode)
            self.file_size = os.fstat(self.fd).st_size
            self.header = self._read_header()
            self._setup()
            if not read_only:
                self._check_writable_image()
            if open_backing and self.header.backing_file:
                self.backing = self._open_backing(_chain)
            if not read_only:
                self._prepare_for_writing()
        except BaseException:
            self._close_files()
            raise

    # Opening

    def _read_header(self) -> header_mod.Header:
        return header_mod.read(self.fd, self.path, self.file_size)

    def _setup(self) -> None:
        h = self.header
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.l2_bits = h.cluster_bits - 3
        self.v3 = h.version >= 3
        self._zero_flag = C.OFLAG_ZERO if self.v3 else 0
        self.csize_shift = 62 - (h.cluster_bits - 8)
        self.csize_mask = (1 << (h.cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        self.l1 = decode_u64(self.read_metadata(h.l1_table_offset, h.l1_size * 8,
                                                "l1_table_offset")) if h.l1_size else array("Q")
        self._l1_dirty: set[int] = set()
        self._l2_valid: dict[int, int] = {}  # L1 index -> checked L2 offset
        # Guest cluster -> host offset of a data cluster whose entry was checked, or -1 for an
        # unallocated one (an overlay's reads mostly are: they go on to the backing file). A
        # read then costs one lookup instead of L1 -> L2 table -> entry checks. Entries leave
        # it when their L2 entry changes (allocating write, discard, write-zeroes, repair).
        self._data_map: dict[int, int] = {}
        self.overlap: ol.MetadataMap | None = None  # writers only (_check_writable_image)
        capacity = max(self._l2_cache_bytes // self.cluster_size, 4)
        self.l2_cache: TableCache[array[int]] = TableCache(capacity, self._load_l2,
                                                      self.flush_metadata)
        self._refcounts: Refcounts | None = None
        self._data_dirty = False
        self._flushing = False
        self._last_compressed: tuple[int, bytes] | None = None

    @property
    def refcounts(self) -> Refcounts:
        if self._refcounts is None:  # only writers and check need them
            capacity = DEFAULT_REFCOUNT_CACHE_BYTES // self.cluster_size
            self._refcounts = Refcounts(self, max(capacity, 16))
        return self._refcounts

    def _check_writable_image(self) -> None:
        h = self.header
        if not self._repair:
            if h.incompatible_features & C.INCOMPAT_CORRUPT:
                raise ImageCorruptError(self.path, "incompatible_features", 72, "the image is "
                                        "marked corrupt (bit 1): it can only be opened "
                                        "read-only; `vmctl image check --repair-all` may fix it")
            if h.nb_snapshots:
                raise UnsupportedFeatureError(self.path, "nb_snapshots", 60, f"writing images "
                                              f"with internal snapshots ({h.nb_snapshots}) is "
                                              "not supported; open read-only")
        self.overlap = self._metadata_map()

    def _metadata_map(self) -> ol.MetadataMap:
        """Every metadata cluster; a bad table entry fails (and marks the image corrupt)
        before any write, except in repair mode, where check reports it instead."""
        from .snapshots import read_table

        h, cs = self.header, self.cluster_size
        found = ol.MetadataMap(self.cluster_bits)
        found.add(0, cs, ol.HEADER)
        found.add(h.l1_table_offset, h.l1_size * 8, ol.L1)
        found.add(h.refcount_table_offset, h.refcount_table_clusters * cs, ol.REFTABLE)
        refcounts = self.refcounts
        entries: list[tuple[Callable[[int], int], int, str]] = [(self._l2_offset, index, ol.L2) for index in range(len(self.l1))]
        entries += [(refcounts.block_offset, index, ol.REFBLOCK)
                    for index in range(len(refcounts.table))]
        for lookup, index, kind in entries:
            try:
                offset = lookup(index)
            except DiskFormatError as error:
                if self._repair:
                    continue
                self.signal_corruption(error.field, error.offset, error.problem)
            if offset:
                found.add(offset, cs, kind)
        if h.nb_snapshots:
            try:
                snapshots, length = read_table(self)
            except DiskFormatError:
                if not self._repair:
                    raise
                snapshots, length = [], 0
            found.add(h.snapshots_offset, length, ol.SNAPSHOT_TABLE)
            for snapshot in snapshots:
                found.add(snapshot.l1_table_offset, snapshot.l1_size * 8, ol.SNAPSHOT_L1)
        for ext in h.other_extensions:
            if ext.type == C.EXT_BITMAPS and h.has_bitmaps and len(ext.data) >= 24:
                size = int.from_bytes(ext.data[8:16], "big")
                offset = int.from_bytes(ext.data[16:24], "big")
                if size <= 64 << 20:
                    found.add(offset, size, ol.BITMAP_DIRECTORY)
        return found

    # Corruption (QEMU's qcow2_signal_corruption)

    def signal_corruption(self, field: str, offset: int, problem: str) -> NoReturn:
        """Refuse what was about to happen; a writer marks the image corrupt (v3: incompatible
        bit 1, on disk at once) and stops all further I/O. Always raises."""
        h = self.header
        marked = False
        if not self._read_only and not self._repair:
            if self.v3 and not h.incompatible_features & C.INCOMPAT_CORRUPT:
                h.incompatible_features |= C.INCOMPAT_CORRUPT
                try:
                    os.pwrite(self.fd, h.incompatible_features.to_bytes(8, "big"), 72)
                    os.fdatasync(self.fd)
                    marked = True
                except OSError:
                    pass
        suffix = ("; write refused and the image marked corrupt (it now opens read-only; "
                  "`vmctl image check --repair-all` may fix it)" if marked else "")
        error = ImageCorruptError(self.path, field, offset, problem + suffix)
        if not self._read_only:
            self._poisoned = str(error)
        raise error

    def check_overlap(self, offset: int, length: int, kind: str, what: str) -> None:
        """Refuse a write of `kind` (ol.DATA, ol.L2, ...) that would land on other metadata."""
        if self.overlap is None:
            return
        victim = self.overlap.conflict(offset, length, kind)
        if victim is not None:
            self.signal_corruption(what, offset, f"write of {kind} at {offset:#x} "
                                   f"(+{length:#x}) would overwrite {victim}")

    def _corrupt_entry(self, field: str, offset: int, problem: str) -> NoReturn:
        """A table entry that cannot be right: EIO for readers, corruption for writers."""
        if self._read_only:
            raise DiskFormatError(self.path, field, offset, problem)
        self.signal_corruption(field, offset, problem)

    def _prepare_for_writing(self) -> None:
        h = self.header
        changed = False
        if h.incompatible_features & C.INCOMPAT_DIRTY:
            from .check import check_image  # a crashed lazy-refcounts writer: rebuild counts
            check_image(self, repair="all")
            h.incompatible_features &= ~C.INCOMPAT_DIRTY
            changed = True
        if h.autoclear_features:
            # Autoclear bits describe data (e.g. bitmaps) a writer must keep in sync; a writer
            # that does not understand them clears them, so readers know to ignore it.
            h.autoclear_features = 0
            changed = True
        if changed:
            self.write_header()
            self.sync()

    def _open_backing(self, chain: tuple[str, ...]) -> BlockBackend:
        from ..block_backend import open_disk

        name = self.header.backing_file or ""
        base_dir = os.path.dirname(os.path.abspath(self.path))
        target = name if os.path.isabs(name) else os.path.join(base_dir, name)
        real = os.path.realpath(target)
        here = os.path.realpath(self.path)
        visited = chain + (here,)
        if real in visited:
            loop = " -> ".join(visited + (real,))
            raise DiskFormatError(self.path, "backing_file_offset", 8,
                                  f"backing chain loops: {loop}")
        if len(visited) > C.MAX_BACKING_DEPTH:
            raise DiskFormatError(self.path, "backing_file_offset", 8, f"backing chain is "
                                  f"deeper than {C.MAX_BACKING_DEPTH} images")
        if not os.path.exists(target):
            raise DiskFormatError(self.path, "backing_file_offset", 8,
                                  f"backing file {name!r} not found (looked at {target})")
        fmt = self.header.backing_format
        if fmt not in (None, "", "raw", "qcow2"):
            raise UnsupportedFeatureError(self.path, "backing format extension",
                                          self.header.header_length,
                                          f"backing format {fmt!r} is not supported")
        return open_disk(target, read_only=True, format=fmt or None, _chain=visited)

    # File access used by the table and refcount code

    def read_metadata(self, offset: int, length: int, field: str) -> bytes:
        """A table from the file; must start inside it, a tail past EOF reads as zeros."""
        if length and offset >= self.file_size:
            raise DiskFormatError(self.path, field, offset, f"table at {offset:#x} is past the "
                                  f"end of the file ({self.file_size:#x} bytes)")
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def pwrite_all(self, data: bytes | memoryview, offset: int, kind: str) -> None:
        """A metadata write of `kind` (overlap.L2, ...), refused if it would hit other
        metadata."""
        self.check_overlap(offset, len(data), kind, kind)
        self._pwritev(offset, [memoryview(data)])

    def _pwritev(self, offset: int, views: list[memoryview]) -> None:
        for group in chunks(views):
            expected = total_length(group)
            written = os.pwritev(self.fd, group, offset)
            if written != expected:  # rare: finish the rest one buffer at a time
                rest = b"".join(bytes(v) for v in group)[written:]
                while rest:
                    count = os.pwrite(self.fd, rest, offset + written)
                    written += count
                    rest = rest[count:]
            offset += expected
        if offset > self.file_size:
            self.file_size = offset

    def reserve_file_end(self, end: int) -> None:
        if end > self.file_size:
            self.file_size = end

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def write_header(self, header: header_mod.Header | None = None) -> None:
        """Write `header` (default: the current one). Encoding happens first, so a header
        that cannot be encoded changes nothing, on disk or in memory."""
        data = (header or self.header).encode(self.path)
        self.pwrite_all(data, 0, ol.HEADER)
        if header is not None:
            self.header = header

    # BlockBackend

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def discard_granularity(self) -> int:
        return self.cluster_size

    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> int:
        views = as_bytes_views(buffers)
        length = total_length(views)
        self._check_range(offset, length, "read")
        with self._mutex:
            self._check_usable()
            self._read(offset, length, views)
        return length

    def write(self, offset: int, buffers: Sequence[memoryview]) -> int:
        views = as_bytes_views(buffers)
        length = total_length(views)
        self._check_writable("write")
        self._check_range(offset, length, "write")
        with self._mutex:
            self._check_usable()
            self._guarded(self._write, offset, length, views)
        return length

    def flush(self) -> None:
        if self._read_only:
            return
        with self._mutex:
            self._check_usable()
            self._guarded(self.flush_metadata)

    def discard(self, offset: int, length: int) -> None:
        self._check_writable("discard")
        self._check_range(offset, length, "discard")
        with self._mutex:
            self._check_usable()
            self._guarded(self._drop_clusters, offset, length, False)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable("write-zeroes")
        self._check_range(offset, length, "write-zeroes")
        with self._mutex:
            self._check_usable()
            self._guarded(self._drop_clusters, offset, length, True)

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            try:
                if not self._read_only and self._poisoned is None:
                    self.flush_metadata()
            finally:
                self._close_files()

    def _close_files(self) -> None:
        self._closed = True
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)  # also drops the OFD lock
            self.fd = -1

    def _check_usable(self) -> None:
        if self._closed:
            raise DiskError(f"{self.path}: image is closed")
        if self._poisoned:
            raise DiskError(f"{self.path}: image disabled after an earlier error: "
                            f"{self._poisoned}")

    def _guarded(self, operation: Callable[..., None], *args: Any) -> None:
        """A format or I/O error in the middle of a change leaves memory ahead of the file:
        stop writing metadata rather than persist a half-made change."""
        try:
            operation(*args)
        except (DiskError, OSError) as error:
            self._poisoned = str(error)
            if isinstance(error, OSError):
                raise DiskError(f"{self.path}: I/O error: {error.strerror}") from None
            raise

    # Lookup

    def _l2_offset(self, l1_index: int) -> int:
        known = self._l2_valid.get(l1_index)
        if known is not None:
            return known
        offset = self._validate_l2_offset(l1_index)
        self._l2_valid[l1_index] = offset
        return offset

    def _validate_l2_offset(self, l1_index: int) -> int:
        entry = self.l1[l1_index]
        offset = entry & C.OFFSET_MASK
        if not offset:
            return 0
        problem = None
        if offset & (self.cluster_size - 1):
            problem = f"L2 table offset {offset:#x} is not cluster aligned"
        elif offset >= self.file_size:
            problem = f"L2 table offset {offset:#x} is past the end of the file"
        if problem:
            where = self.header.l1_table_offset + 8 * l1_index
            raise DiskFormatError(self.path, f"L1 entry {l1_index}", where, problem)
        return offset

    def _load_l2(self, offset: int) -> array[int]:
        return decode_u64(self.read_metadata(offset, self.cluster_size, "L2 table"))

    def _entry(self, cluster: int) -> tuple[int, int, int]:
        """(L2 entry, L2 table offset, index in table) of a guest cluster; entry 0 if none."""
        l1_index = cluster >> self.l2_bits
        if l1_index >= len(self.l1):
            return 0, 0, 0
        l2_offset = self._l2_offset(l1_index)
        if not l2_offset:
            return 0, 0, 0
        index = cluster & ((1 << self.l2_bits) - 1)
        return self.l2_cache.get(l2_offset)[index], l2_offset, index

    def classify(self, cluster: int) -> tuple[int, int]:
        """(kind, host offset or the raw entry for compressed) of a guest cluster."""
        host = self._data_map.get(cluster)
        if host is not None:
            return (DATA, host) if host >= 0 else (UNALLOCATED, 0)
        entry, l2_offset, index = self._entry(cluster)
        if not entry:
            self._remember(cluster, -1)
            return UNALLOCATED, 0
        if entry & C.OFLAG_COMPRESSED:
            return COMPRESSED, entry
        if entry & C.OFLAG_ZERO:
            if self.v3:
                host = entry & C.OFFSET_MASK
                if host & (self.cluster_size - 1):  # freeing it would free another cluster
                    self._corrupt_entry(f"L2 entry {index} of the table at {l2_offset:#x}",
                                        l2_offset + 8 * index, f"preallocated zero cluster "
                                        f"offset {host:#x} is not cluster aligned")
                return ZERO, host
            self._corrupt_entry(f"L2 entry {index} of the table at {l2_offset:#x}",
                                l2_offset + 8 * index, "zero cluster flag (bit 0) in a "
                                "version 2 image")
        host = entry & C.OFFSET_MASK
        if not host:
            self._remember(cluster, -1)
            return UNALLOCATED, 0
        if host & (self.cluster_size - 1) or host >= self.file_size:
            what = "not cluster aligned" if host & (self.cluster_size - 1) else \
                "past the end of the file"
            self._corrupt_entry(f"L2 entry {index} of the table at {l2_offset:#x}",
                                l2_offset + 8 * index, f"data cluster offset {host:#x} is {what}")
        self._remember(cluster, host)
        return DATA, host

    def _remember(self, cluster: int, host: int) -> None:
        if len(self._data_map) >= DATA_MAP_ENTRIES:
            self._data_map.clear()  # bounded memory; refilled by the next reads
        self._data_map[cluster] = host

    def forget_mappings(self) -> None:
        """Drop every remembered cluster mapping (after L1 or L2 entries changed behind
        the image's own write paths, e.g. a repair)."""
        self._data_map.clear()

    def _extent(self, pos: int, end: int) -> tuple[int, int, int]:
        """The longest run from `pos` of one kind (and contiguous host clusters for data)."""
        cb = self.cluster_bits
        cs = self.cluster_size
        kind, host = self.classify(pos >> cb)
        step = min(cs - (pos & (cs - 1)), end - pos)
        if kind == COMPRESSED:
            return kind, host, step
        nxt = pos + step
        if kind == UNALLOCATED:
            nxt = min(end, max(nxt, self._empty_l1_span_end(pos)))
        expect = host + cs
        while nxt < end:
            if kind == UNALLOCATED:  # whole L2 spans without a table: skip them at once
                skip = self._empty_l1_span_end(nxt)
                if skip > nxt:
                    nxt = min(end, skip)
                    continue
            kind2, host2 = self.classify(nxt >> cb)
            if kind2 != kind or (kind == DATA and host2 != expect):
                break
            nxt += min(cs, end - nxt)
            expect += cs
        if kind == DATA:
            host += pos & (cs - 1)
        return kind, host, nxt - pos

    def _empty_l1_span_end(self, pos: int) -> int:
        """End of the guest range mapped by pos's L1 entry if it has no L2 table, else pos."""
        l1_index = pos >> (self.cluster_bits + self.l2_bits)
        if l1_index < len(self.l1) and self._l2_offset(l1_index):
            return pos
        return (l1_index + 1) << (self.cluster_bits + self.l2_bits)

    # Reading

    def _read(self, offset: int, length: int, views: list[memoryview]) -> None:
        pos, end, done = offset, offset + length, 0
        while pos < end:
            kind, host, count = self._extent(pos, end)
            dest = slice_buffers(views, done, count)
            if kind == DATA:
                self._preadv(host, dest, count)
            elif kind == UNALLOCATED:
                self._read_backing(pos, count, dest)
            elif kind == ZERO:
                zero_fill(dest)
            else:
                data = self._decompress(host, pos >> self.cluster_bits)
                start = pos & (self.cluster_size - 1)
                source = memoryview(data)[start:start + count]
                at = 0
                for view in dest:
                    view[:] = source[at:at + view.nbytes]
                    at += view.nbytes
            pos += count
            done += count

    def _preadv(self, host: int, dest: list[memoryview], count: int) -> None:
        got = 0
        for group in chunks(dest):
            got += os.preadv(self.fd, group, host + got)
        if got < count:  # a data cluster that ends past EOF reads as zeros, like QEMU
            zero_fill(slice_buffers(dest, got, count - got))

    def _read_backing(self, pos: int, count: int, dest: list[memoryview]) -> None:
        backing = self.backing
        inside = 0 if backing is None else max(0, min(count, backing.size - pos))
        if inside and backing is not None:
            backing.readinto(pos, slice_buffers(dest, 0, inside))
        if inside < count:
            zero_fill(slice_buffers(dest, inside, count - inside))

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """(host offset, byte length) of a compressed cluster's deflate stream."""
        coffset = entry & self.coffset_mask
        sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return coffset, sectors * 512 - (coffset & 511)

    def _decompress(self, entry: int, cluster: int) -> bytes:
        cached = self._last_compressed
        if cached is not None and cached[0] == entry:
            return cached[1]
        coffset, csize = self.compressed_range(entry)
        where = f"compressed L2 entry of guest cluster {cluster}"
        if coffset >= self.file_size:
            raise DiskFormatError(self.path, where, coffset, "compressed data offset is past "
                                  "the end of the file")
        data = os.pread(self.fd, csize, coffset)
        try:
            inflater = zlib.decompressobj(-15)
            out = inflater.decompress(data, self.cluster_size)
        except zlib.error as error:
            raise DiskFormatError(self.path, where, coffset, f"bad deflate data: {error}") \
                from None
        if len(out) != self.cluster_size:
            raise DiskFormatError(self.path, where, coffset, f"decompresses to {len(out)} "
                                  f"bytes, not the cluster size {self.cluster_size}")
        self._last_compressed = (entry, out)
        return out

    # Writing

    def _l2_for_write(self, l1_index: int) -> int:
        """Host offset of a writable L2 table for `l1_index`, allocating it if needed."""
        if l1_index >= len(self.l1):
            raise DiskFormatError(self.path, "l1_size", 36, f"L1 index {l1_index} out of range")
        entry = self.l1[l1_index]
        offset = self._l2_offset(l1_index)
        if offset:  # about to be changed in place: must not be other metadata
            self.check_overlap(offset, self.cluster_size, ol.L2, f"L1 entry {l1_index}")
        if offset and entry & C.OFLAG_COPIED:
            return offset
        if offset:
            if self.refcounts.get(offset >> self.cluster_bits) != 1:
                raise UnsupportedFeatureError(self.path, f"L1 entry {l1_index}",
                                              self.header.l1_table_offset + 8 * l1_index,
                                              "shared L2 table (snapshots) cannot be written")
            self.l1[l1_index] = offset | C.OFLAG_COPIED
            self._l1_dirty.add(l1_index)
            return offset
        offset = self.refcounts.allocate()
        if self.overlap is not None:
            self.overlap.add(offset, self.cluster_size, ol.L2)
        self.l2_cache.put_new(offset, array("Q", bytes(self.cluster_size)))
        self.l1[l1_index] = offset | C.OFLAG_COPIED
        self._l2_valid[l1_index] = offset
        self._l1_dirty.add(l1_index)
        return offset

    def _write(self, offset: int, length: int, views: list[memoryview]) -> None:
        cb, cs = self.cluster_bits, self.cluster_size
        l2_mask = (1 << self.l2_bits) - 1
        segments: list[list[Any]] = []  # [host offset, buffers, byte count], host-contiguous
        updates: list[tuple[int, int, int, int, int]] = []  # (cluster, l2 offset, index, new, old entry)
        pos, end, done = offset, offset + length, 0
        while pos < end:
            cluster = pos >> cb
            within = pos & (cs - 1)
            count = min(cs - within, end - pos)
            data = slice_buffers(views, done, count)
            l2_offset = self._l2_for_write(cluster >> self.l2_bits)
            index = cluster & l2_mask
            entry = self.l2_cache.get(l2_offset)[index]
            host = self._in_place(entry, cluster)
            if host:
                _append(segments, host + within, data, count)
            else:
                new = self.refcounts.allocate()
                if count < cs:
                    data = self._with_old_content(cluster, within, count, data)
                _append(segments, new, data, cs)
                updates.append((cluster, l2_offset, index, new | C.OFLAG_COPIED, entry))
            pos += count
            done += count
        for host, _, count in segments:  # all checked before anything is written
            self.check_overlap(host, count, ol.DATA, "guest data")
        for host, buffers, _ in segments:
            self._pwritev(host, buffers)
        self._data_dirty = True
        for cluster, l2_offset, index, new, old in updates:
            self._data_map.pop(cluster, None)
            self.l2_cache.get(l2_offset)[index] = new
            self.l2_cache.mark_dirty(l2_offset)
            self._release(old)

    def _in_place(self, entry: int, cluster: int) -> int:
        """Host cluster a write may overwrite directly, or 0 when it must copy on write."""
        if not entry:
            return 0
        kind, host = self.classify(cluster)  # validates the entry, even one being replaced
        if not entry & C.OFLAG_COPIED or kind != DATA:
            return 0
        self.check_overlap(host, self.cluster_size, ol.DATA, f"L2 entry of guest cluster "
                           f"{cluster}")
        return host

    def _with_old_content(self, cluster: int, within: int, count: int,
                          data: list[memoryview]) -> list[memoryview]:
        """Pad a partial-cluster write with the cluster's current content (backing, zeros,
        compressed or shared data) so the new cluster is complete."""
        base = cluster << self.cluster_bits
        parts: list[memoryview] = []
        if within:
            head = memoryview(bytearray(within))
            self._read(base, within, [head])
            parts.append(head)
        parts += data
        tail_len = self.cluster_size - within - count
        if tail_len:
            tail = memoryview(bytearray(tail_len))
            inside = max(0, min(tail_len, self.size - (base + within + count)))
            if inside:
                self._read(base + within + count, inside, [tail[:inside]])
            parts.append(tail)
        return parts

    def _release(self, entry: int) -> None:
        """Drop the reference an old L2 entry held (applied after the next table flush)."""
        if entry & C.OFLAG_COMPRESSED:
            coffset, csize = self.compressed_range(entry)
            start = coffset & ~511
            first = start >> self.cluster_bits
            last = (start + ((entry >> self.csize_shift & self.csize_mask) + 1) * 512 - 1) \
                >> self.cluster_bits
            for cluster in range(first, last + 1):
                self.refcounts.free_later(cluster)
            return
        host = entry & C.OFFSET_MASK
        if host:
            self.refcounts.free_later(host >> self.cluster_bits)

    def _drop_clusters(self, offset: int, length: int, zeroes: bool) -> None:
        """Discard (zeroes=False) or write-zeroes over whole clusters via L2 entries; the
        partial clusters at the ends are written (zeroes) or left alone (discard)."""
        cs = self.cluster_size
        end = offset + length
        first = -(-offset // cs)
        last = end // cs  # exclusive
        if end == self.size:
            last = -(-end // cs)  # the final partial cluster counts as whole
        if first >= last:
            if zeroes:
                self._write_zero_bytes(offset, length)
            return
        if zeroes:
            self._write_zero_bytes(offset, min(first * cs, end) - offset)
            self._write_zero_bytes(last * cs, max(0, end - last * cs))
        has_backing = self.backing is not None or bool(self.header.backing_file)
        if has_backing and not self.v3:
            if zeroes:  # v2 cannot mark zero clusters: write real zeros over the backing data
                self._write_zero_bytes(first * cs, min(last * cs, end) - first * cs)
            return
        new_entry = C.OFLAG_ZERO if has_backing else 0
        l2_mask = (1 << self.l2_bits) - 1
        for cluster in range(first, last):
            l1_index = cluster >> self.l2_bits
            if not has_backing and not self._l2_offset(l1_index):
                continue  # unallocated without backing already reads zeros
            l2_offset = self._l2_for_write(l1_index)
            table = self.l2_cache.get(l2_offset)
            old = table[cluster & l2_mask]
            if old == new_entry:
                continue
            table[cluster & l2_mask] = new_entry
            self._data_map.pop(cluster, None)
            self.l2_cache.mark_dirty(l2_offset)
            self._release(old)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        while length > 0:
            count = min(length, len(_ZEROS))
            self._write(offset, count, [_ZEROS[:count]])
            offset += count
            length -= count

    # Growing (what `qemu-img commit` does to a base smaller than the overlay)

    def grow(self, new_size: int) -> None:
        """Make the virtual disk `new_size` bytes (never smaller). The L1 table grows in place
        when its last cluster has room, else moves: new table written and synced, header
        switched in one write, old clusters freed after."""
        self._check_writable("grow")
        with self._mutex:
            self._check_usable()
            self._guarded(self._grow, -(-new_size // 512) * 512)

    def _grow(self, new_size: int) -> None:
        import dataclasses

        h, cs = self.header, self.cluster_size
        if new_size <= h.size:
            return
        if new_size > C.MAX_VIRTUAL_SIZE:
            raise DiskError(f"{self.path}: cannot grow to {new_size} bytes")
        entries = -(-new_size // (cs << self.l2_bits))
        if entries * 8 > C.MAX_L1_BYTES:
            raise DiskError(f"{self.path}: {new_size} bytes needs an L1 table above 32 MiB")
        self.flush_metadata()
        have = -(-h.l1_size * 8 // cs) * cs // 8  # entries the allocated L1 clusters hold
        tail = os.pread(self.fd, (have - h.l1_size) * 8, h.l1_table_offset + h.l1_size * 8) \
            if h.l1_size and have > h.l1_size else b""  # past EOF reads as zeros
        if h.l1_size and entries <= have and not any(tail):
            new_header = dataclasses.replace(h, size=new_size, l1_size=entries)
            self.write_header(new_header)
            self.sync()
            self.l1.extend([0] * (entries - len(self.l1)))
            return
        clusters = -(-entries * 8 // cs)
        offset = self.refcounts.allocate(clusters)
        table = array("Q", self.l1)
        table.extend([0] * (clusters * cs // 8 - len(table)))
        new_header = dataclasses.replace(h, size=new_size, l1_size=entries,
                                         l1_table_offset=offset)
        new_header.encode(self.path)
        self.refcounts.write_dirty_blocks()
        self._pwritev(offset, [memoryview(encode_u64(table))])
        self.sync()
        old_offset, old_size = h.l1_table_offset, h.l1_size
        if self.overlap is not None:
            self.overlap.add(offset, clusters * cs, ol.L1)
        self.write_header(new_header)
        self.sync()
        self.l1 = table[:entries]
        if self.overlap is not None and old_size:
            self.overlap.remove(old_offset, old_size * 8, ol.L1)
        if old_size:
            first = old_offset >> self.cluster_bits
            for cluster in range(first, first + -(-old_size * 8 // cs)):
                self.refcounts.free_later(cluster)
        self.flush_metadata()

    # Ordered flush

    def flush_metadata(self) -> None:
        """Write cached metadata in crash-safe order (module docstring); re-entrant safe."""
        if self._read_only or self._poisoned:
            return
        if self._flushing:  # an eviction during step 5: tables are already on disk
            if self._refcounts is not None:
                self._refcounts.write_dirty_blocks()
            return
        self._flushing = True
        try:
            refcounts = self._refcounts
            wrote = refcounts.write_dirty_blocks() if refcounts else False
            if wrote or self._data_dirty:
                self.sync()
                self._data_dirty = False
            if refcounts and refcounts.write_table():
                self.sync()
            if self.l2_cache.dirty:
                for offset, table in self.l2_cache.dirty_items():
                    self.pwrite_all(encode_u64(table), offset, ol.L2)
                self.l2_cache.dirty.clear()
                self.sync()
            if self._l1_dirty:
                self._write_l1()
                self.sync()
            if refcounts and refcounts.apply_pending_frees():
                refcounts.write_dirty_blocks()
                self.sync()
        finally:
            self._flushing = False

    def _write_l1(self) -> None:
        base = self.header.l1_table_offset
        if len(self._l1_dirty) > 64:
            self.pwrite_all(encode_u64(self.l1), base, ol.L1)
        else:
            for index in sorted(self._l1_dirty):
                self.pwrite_all(self.l1[index].to_bytes(8, "big"), base + 8 * index, ol.L1)
        self._l1_dirty.clear()


def _append(segments: list[list[Any]], host: int, buffers: list[memoryview], count: int) -> None:
    if segments and segments[-1][0] + segments[-1][2] == host and len(segments[-1][1]) < 512:
        segments[-1][1].extend(buffers)
        segments[-1][2] += count
    else:
        segments.append([host, list(buffers), count])

