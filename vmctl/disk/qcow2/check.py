"""Consistency check like `qemu-img check`: recount every reference and compare.

References come from the header cluster, the L1/L2 tables (active and snapshots), data and
compressed clusters, the refcount table and blocks, the snapshot table and the bitmap
directory. A stored refcount above the references is a leak (harmless, repairable); below
them (or a bad table entry) is a corruption.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

from ..block_backend import DiskError, DiskFormatError
from . import constants as C
from . import overlap as ol
from .image import Qcow2Image
from .snapshots import read_table
from .tables import decode_u64

_BITMAP_EXT = struct.Struct(">IIQQ")
_BITMAP_ENTRY = struct.Struct(">QIIBBHI")
MAX_MESSAGES = 1000  # a badly broken image must not flood the terminal


@dataclass
class CheckReport:
    filename: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0  # parts that could not be checked (qemu-img: exit status 1)
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    messages: list[str] = field(default_factory=list)
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0

    @property
    def clean(self) -> bool:
        return not self.corruptions and not self.leaks

    def note(self, message: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)

    def as_dict(self) -> dict[str, Any]:
        """The keys of `qemu-img check --output=json`."""
        out = {
            "image-end-offset": self.image_end_offset,
            "total-clusters": self.total_clusters,
            "check-errors": self.check_errors,
            "allocated-clusters": self.allocated_clusters,
            "filename": self.filename,
            "format": "qcow2",
        }
        if self.fragmented_clusters:
            out["fragmented-clusters"] = self.fragmented_clusters
        if self.compressed_clusters:
            out["compressed-clusters"] = self.compressed_clusters
        if self.corruptions:
            out["corruptions"] = self.corruptions
        if self.leaks:
            out["leaks"] = self.leaks
        if self.corruptions_fixed:
            out["corruptions-fixed"] = self.corruptions_fixed
        if self.leaks_fixed:
            out["leaks-fixed"] = self.leaks_fixed
        return out

    def summary(self) -> list[str]:
        lines = list(self.messages)
        if self.leaks_fixed or self.corruptions_fixed:
            lines.append(f"Repaired {self.leaks_fixed} leaked clusters and "
                         f"{self.corruptions_fixed} corruptions.")
        if self.clean:
            lines.append("No errors were found on the image.")
        else:
            if self.corruptions:
                lines.append(f"{self.corruptions} errors were found on the image.")
            if self.leaks:
                lines.append(f"{self.leaks} leaked clusters were found on the image; this "
                             "wastes space only (repair with --repair).")
        total = max(self.total_clusters, 1)
        lines.append(f"{self.allocated_clusters}/{self.total_clusters} = "
                     f"{100 * self.allocated_clusters / total:.2f}% allocated, "
                     f"{100 * self.fragmented_clusters / max(self.allocated_clusters, 1):.2f}% "
                     f"fragmented, {100 * self.compressed_clusters / max(self.allocated_clusters, 1):.2f}%"
                     " compressed clusters")
        lines.append(f"Image end offset: {self.image_end_offset}")
        return lines


def check(path: str, repair: str | None = None) -> CheckReport:
    """Check one image file (not its backing chain); repair 'leaks' or 'all' refcounts."""
    if repair not in (None, "leaks", "all"):
        raise DiskError(f"repair mode {repair!r} must be 'leaks' or 'all'")
    image = Qcow2Image(path, read_only=repair is None, open_backing=False,
                       repair=repair is not None)
    try:
        report = check_image(image, repair)
    finally:
        image.close()
    return report


def check_image(image: Qcow2Image, repair: str | None = None) -> CheckReport:
    if not image.read_only:
        image.flush_metadata()
    report = _Checker(image).run()
    if repair and not report.clean:
        fixed_leaks, fixed_errors = _repair(image, report, repair)
        report = _Checker(image).run()
        report.leaks_fixed, report.corruptions_fixed = fixed_leaks, fixed_errors
    if repair and not report.corruptions and not report.check_errors:
        _mark_consistent(image)  # as QEMU: a repaired image loses its corrupt bit
    return report


def _mark_consistent(image: Qcow2Image) -> None:
    h = image.header
    if h.incompatible_features & C.INCOMPAT_CORRUPT:
        h.incompatible_features &= ~C.INCOMPAT_CORRUPT
        os.pwrite(image.fd, h.incompatible_features.to_bytes(8, "big"), 72)
        os.fdatasync(image.fd)


class _Checker:
    def __init__(self, image: Qcow2Image, count_refcounts: bool = True) -> None:
        self.count_refcounts = count_refcounts  # False: references for a refcount rebuild
        self.image = image
        self.h = image.header
        self.cs = image.cluster_size
        self.cb = image.cluster_bits
        self.clusters = -(-image.file_size // self.cs)
        self.refs = array("I", bytes(4 * self.clusters))
        self.report = CheckReport(image.path)
        # (what, entry, host cluster, table offset, index, is L1) of every COPIED candidate
        self.copied: list[tuple[str, int, int, int, int, bool]] = []
        self.copied_errors: list[tuple[int, int, int, bool]] = []
        self.entry_fixes: list[tuple[int, int, int]] = []  # (L2 table, index, new entry)
        self.refcount_damage = False  # a reference no refcount block can hold
        self.highest = -1
        self.budget = 16 * self.clusters + 1024  # L2 table visits allowed

    def corrupt(self, message: str) -> None:
        self.report.corruptions += 1
        self.report.note(f"ERROR {message}")

    def ref(self, offset: int, length: int, what: str) -> None:
        if length <= 0:
            return
        first, last = offset >> self.cb, (offset + length - 1) >> self.cb
        if last >= self.clusters:
            self.corrupt(f"{what} at {offset:#x} is past the end of the file")
            last = self.clusters - 1
        for cluster in range(first, last + 1):
            self.refs[cluster] += 1
        self.highest = max(self.highest, last)

    def run(self) -> CheckReport:
        h, report = self.h, self.report
        report.total_clusters = -(-h.size // self.cs)
        self.ref(0, self.cs, "header")
        self.walk_l1(self.image.l1, h.l1_table_offset, active=True)
        if self.count_refcounts:
            self.ref(h.refcount_table_offset, h.refcount_table_clusters * self.cs,
                     "refcount table")
        refcounts = self.image.refcounts
        for index, entry in enumerate(refcounts.table if self.count_refcounts else ()):
            offset = entry & ~C.REFTABLE_RESERVED & ((1 << 56) - 1)
            if not offset:
                continue
            if entry & C.REFTABLE_RESERVED:
                self.corrupt(f"refcount table entry {index} has reserved bits set")
                continue
            if offset & (self.cs - 1):
                self.corrupt(f"refcount block {index} offset {offset:#x} is unaligned")
                continue
            self.ref(offset, self.cs, f"refcount block {index}")
        self.walk_snapshots()
        self.walk_bitmaps()
        self.compare()
        report.image_end_offset = (self.highest + 1) * self.cs
        return report

    def walk_l1(self, l1: array[int], l1_offset: int, active: bool) -> None:
        self.ref(l1_offset, len(l1) * 8, "L1 table")
        next_offset = 0
        for index in compress(range(len(l1)), l1):
            entry = l1[index]
            offset = entry & C.OFFSET_MASK
            if not offset:
                continue
            where = f"L1 entry {index} (byte {l1_offset + 8 * index:#x})"
            if entry & C.L1_RESERVED:
                self.corrupt(f"{where}: reserved bits set in {entry:#x}")
            if offset & (self.cs - 1):
                self.corrupt(f"{where}: L2 offset {offset:#x} is unaligned")
                continue
            if offset >= self.image.file_size:
                self.corrupt(f"{where}: L2 offset {offset:#x} is past the end of the file")
                continue
            self.ref(offset, self.cs, where)
            if active:
                self.copied.append((f"L2 cluster: l1_index={index} l1_entry={entry:x}",
                                    entry, offset >> self.cb, l1_offset, index, True))
            self.budget -= 1
            if self.budget < 0:  # e.g. thousands of snapshots sharing one huge L1 table
                raise DiskError(f"{self.image.path}: snapshot L1 tables reference more L2 "
                                "tables than the file can hold; giving up (hostile image?)")
            table = decode_u64(self.image.read_metadata(offset, self.cs, "L2 table"))
            next_offset = self.walk_l2(table, offset, active, next_offset)

    def walk_l2(self, table: array[int], l2_offset: int, active: bool, next_offset: int) -> int:
        report, image = self.report, self.image
        for index in compress(range(len(table)), table):
            entry = table[index]
            where = f"L2 entry {index} of table {l2_offset:#x}"
            if entry & C.OFLAG_COMPRESSED:
                if entry & C.OFLAG_COPIED:
                    self.corrupt(f"{where}: compressed cluster has the COPIED flag")
                coffset, _ = image.compressed_range(entry)
                sectors = ((entry >> image.csize_shift) & image.csize_mask) + 1
                self.ref(coffset & ~511, sectors * 512, where)
                if active:
                    report.allocated_clusters += 1
                    report.compressed_clusters += 1
                    report.fragmented_clusters += 1
                continue
            if entry & C.L2_RESERVED:
                self.corrupt(f"{where}: reserved bits set in {entry:#x}")
            host = entry & C.OFFSET_MASK
            if entry & C.OFLAG_ZERO and not self.image.v3:
                self.corrupt(f"{where}: zero cluster flag in a version 2 image")
            if not host:
                continue
            if host & (self.cs - 1):
                self.corrupt(f"{where}: data offset {host:#x} is unaligned")
                if entry & C.OFLAG_ZERO and active:  # QEMU repairs: a plain zero cluster
                    self.entry_fixes.append((l2_offset, index, C.OFLAG_ZERO))
                continue
            if host >= image.file_size:
                self.corrupt(f"{where}: data offset {host:#x} is past the end of the file")
                continue
            self.ref(host, self.cs, where)
            if active:
                report.allocated_clusters += 1
                if next_offset and host != next_offset:
                    report.fragmented_clusters += 1
                next_offset = host + self.cs
                self.copied.append((f"data cluster: l2_entry={entry:x}", entry,
                                    host >> self.cb, l2_offset, index, False))
        return next_offset

    def walk_snapshots(self) -> None:
        h, image = self.h, self.image
        if not h.nb_snapshots:
            return
        snapshots, length = read_table(image)  # a table out of bounds: QEMU cannot open it
        for snapshot in snapshots:
            if snapshot.l1_size:
                l1 = decode_u64(image.read_metadata(snapshot.l1_table_offset,
                                                    snapshot.l1_size * 8,
                                                    f"snapshot {snapshot.index} L1 table"))
                self.walk_l1(l1, snapshot.l1_table_offset, active=False)
        self.ref(h.snapshots_offset, length, "snapshot table")

    def walk_bitmaps(self) -> None:
        if not self.h.has_bitmaps:
            return
        ext = next(e for e in self.h.other_extensions if e.type == C.EXT_BITMAPS)
        if len(ext.data) < _BITMAP_EXT.size:
            self.corrupt("bitmaps extension is too short")
            return
        count, _, dir_size, dir_offset = _BITMAP_EXT.unpack_from(ext.data)
        if dir_size > 64 << 20:
            self.corrupt(f"bitmap directory size {dir_size} is absurd")
            return
        self.ref(dir_offset, dir_size, "bitmap directory")
        directory = self.image.read_metadata(dir_offset, dir_size, "bitmap directory")
        at = 0
        for number in range(count):
            if at + _BITMAP_ENTRY.size > len(directory):
                self.corrupt(f"bitmap {number} runs past the bitmap directory")
                return
            table_offset, table_size, _, _, _, name_size, extra = \
                _BITMAP_ENTRY.unpack_from(directory, at)
            at += _BITMAP_ENTRY.size + extra + name_size
            at += -at % 8
            if table_size * 8 > 64 << 20:
                self.corrupt(f"bitmap {number}: table size {table_size} is absurd")
                continue
            self.ref(table_offset, table_size * 8, f"bitmap {number} table")
            table = decode_u64(self.image.read_metadata(table_offset, table_size * 8,
                                                        f"bitmap {number} table"))
            for entry in table:
                if entry & C.OFFSET_MASK:
                    self.ref(entry & C.OFFSET_MASK, self.cs, f"bitmap {number} data")

    def compare(self) -> None:
        refcounts, refs = self.image.refcounts, self.refs
        self.shared_blocks: list[int] = []  # refcount table indices
        for index, entry in enumerate(refcounts.table):
            offset = entry & C.OFFSET_MASK
            if entry & C.REFTABLE_RESERVED or not offset or offset & (self.cs - 1) \
                    or offset >= self.image.file_size:
                continue
            if refs[offset >> self.cb] != 1:  # a refcount block shares its cluster
                self.corrupt(f"refcount block {index} refcount={refs[offset >> self.cb]}")
                self.shared_blocks.append(index)
        for cluster in range(self.clusters):
            stored, wanted = self.stored(cluster), refs[cluster]
            if stored != wanted:
                self.mismatch(cluster, stored, wanted)
        # Refcounts of clusters past the end of the file (a crash after the refcount block
        # reached the disk but before the data did) are ignored, as QEMU does: nothing can
        # reference them, and the allocator skips them until the file grows over them.
        for what, entry, cluster, table, index, is_l1 in self.copied:
            stored = self.stored(cluster)
            if bool(entry & C.OFLAG_COPIED) != (stored == 1):
                self.corrupt(f"OFLAG_COPIED {what} refcount={stored}")
                self.copied_errors.append((table, index, stored, is_l1))

    def mismatch_fixable(self, cluster: int) -> bool:
        refcounts = self.image.refcounts
        try:
            return bool(refcounts.block_offset(cluster // refcounts.block_entries))
        except DiskFormatError:
            return False

    def stored(self, cluster: int) -> int:
        """A stored refcount; a broken refcount block (already reported) counts as 0."""
        try:
            return self.image.refcounts.get(cluster)
        except DiskFormatError:
            return 0

    def mismatch(self, cluster: int, stored: int, wanted: int) -> None:
        if not self.mismatch_fixable(cluster):
            self.refcount_damage = True
        if stored < wanted:
            self.corrupt(f"cluster {cluster} refcount={stored} reference={wanted}")
        else:
            self.report.leaks += 1
            self.report.note(f"Leaked cluster {cluster} refcount={stored} reference={wanted}")


def _repair(image: Qcow2Image, report: CheckReport, mode: str) -> tuple[int, int]:
    """Set stored refcounts to the counted references: leaks always, errors in 'all' mode."""
    if image.read_only:
        raise DiskError(f"{image.path}: repair needs the image open for writing")
    checker = _Checker(image)
    checker.run()
    refcounts = image.refcounts
    leaks = errors = 0
    if mode == "all" and checker.entry_fixes:
        for table, index, entry in checker.entry_fixes:
            image.pwrite_all(entry.to_bytes(8, "big"), table + 8 * index, ol.L2)
            image.l2_cache.drop(table)
        image.sync()
        errors += len(checker.entry_fixes)
        checker = _Checker(image)
        checker.run()
    if mode == "all" and (checker.refcount_damage or any(
            e & C.REFTABLE_RESERVED or (e & C.OFFSET_MASK) & (image.cluster_size - 1)
            for e in image.refcounts.table)):
        errors += _rebuild_refcounts(image)
        return leaks, errors
    if mode == "all" and checker.shared_blocks:
        errors += _move_shared_blocks(image, checker.shared_blocks)
        checker = _Checker(image)
        checker.run()
    for cluster in range(max(checker.clusters, 0)):
        stored, wanted = checker.stored(cluster), checker.refs[cluster]
        if stored == wanted:
            continue
        if stored > wanted or mode == "all":
            if not refcounts.block_offset(cluster // refcounts.block_entries):
                continue  # no block to hold the count: leave it for a rebuild
            refcounts.set(cluster, wanted)
            if stored > wanted:
                leaks += 1
            else:
                errors += 1
    refcounts.write_dirty_blocks()
    os.fdatasync(image.fd)
    if mode == "all":  # OFLAG_COPIED must say "refcount is exactly 1", as QEMU repairs it
        checker = _Checker(image)
        checker.run()
        errors += _repair_copied(image, checker.copied_errors)
    return leaks, errors


def _rebuild_refcounts(image: Qcow2Image) -> int:
    """QEMU's "Rebuilding refcount structure": a new refcount table and blocks at the end of
    the file, holding the counted references; the header switches to them in one write."""
    import dataclasses

    from .refcounts import RefcountBlock
    from .tables import encode_u64

    checker = _Checker(image, count_refcounts=False)
    checker.run()
    cs, h = image.cluster_size, image.header
    per_block = cs * 8 >> h.refcount_order
    limit = (1 << (1 << h.refcount_order)) - 1
    start = checker.clusters
    blocks, table_clusters = 1, 1
    while True:
        total = start + table_clusters + blocks
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cs)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    table = array("Q", bytes(table_clusters * cs))
    first_block = start + table_clusters
    for n in range(blocks):
        block = RefcountBlock(h.refcount_order, bytes(cs))
        for index in range(per_block):
            cluster = n * per_block + index
            count = checker.refs[cluster] if cluster < start else \
                1 if cluster < start + table_clusters + blocks else 0
            if count:
                block.set(index, min(count, limit))
        offset = (first_block + n) * cs
        image.pwrite_all(block.encode(), offset, ol.REFBLOCK)
        table[n] = offset
    image.pwrite_all(encode_u64(table), start * cs, ol.REFTABLE)
    image.sync()
    image.write_header(dataclasses.replace(h, refcount_table_offset=start * cs,
                                           refcount_table_clusters=table_clusters))
    image.sync()
    image.file_size = max(image.file_size, (start + table_clusters + blocks) * cs)
    image._refcounts = None  # reload from the new table
    image.overlap = None
    return 1


def _move_shared_blocks(image: Qcow2Image, indices: list[int]) -> int:
    """A refcount block whose cluster something else also uses (say, guest data) gets a
    cluster of its own at the end of the file; the other user keeps the old one (QEMU
    rebuilds the refcount structure for the same result)."""
    refcounts, cs = image.refcounts, image.cluster_size
    moved = 0
    for index in indices:
        old = refcounts.block_offset(index)
        new = -(-image.file_size // cs) * cs
        if not refcounts.block_offset((new >> image.cluster_bits) // refcounts.block_entries):
            continue  # nothing would count the new cluster: leave it
        block = refcounts.blocks.get(old)
        image.pwrite_all(block.encode(), new, ol.REFBLOCK)
        refcounts.blocks.drop(old)
        refcounts.table[index] = new
        refcounts.table_dirty = True
        if image.overlap is not None:
            image.overlap.remove(old, cs, ol.REFBLOCK)
            image.overlap.add(new, cs, ol.REFBLOCK)
        image.sync()
        refcounts.write_table()
        image.sync()
        moved += 1
    return moved


def _repair_copied(image: Qcow2Image, wrong: list[tuple[int, int, int, bool]]) -> int:
    for table, index, refcount, is_l1 in wrong:
        at = table + 8 * index
        entry = int.from_bytes(os.pread(image.fd, 8, at), "big")
        entry = entry | C.OFLAG_COPIED if refcount == 1 else entry & ~C.OFLAG_COPIED
        image.pwrite_all(entry.to_bytes(8, "big"), at, ol.L1 if is_l1 else ol.L2)
        if is_l1 and table == image.header.l1_table_offset:
            image.l1[index] = entry
            image._l2_valid.pop(index, None)
        elif image.l2_cache.cached(table):
            image.l2_cache.drop(table)
    if wrong:
        image.forget_mappings()
        os.fdatasync(image.fd)
    return len(wrong)
