"""The internal snapshot table: parsed with bounds checks (QEMU iotests 080), for `info`,
`check` and the overlap map. vmctl never writes snapshots."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..block_backend import DiskFormatError
from . import constants as C

if TYPE_CHECKING:
    from .image import Qcow2Image

_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes, then extra data, id, name, padding to 8
MAX_EXTRA = 1024  # QEMU's limit on a snapshot's extra data
MAX_TABLE_BYTES = 64 << 20  # QEMU's QCOW_MAX_SNAPSHOTS_SIZE


@dataclass
class Snapshot:
    index: int
    entry_offset: int
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    icount: int | None

    def as_dict(self) -> dict[str, object]:
        """The keys of one `qemu-img info --output=json` snapshot."""
        out = {"vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000, "name": self.name,
               "date-sec": self.date_sec, "date-nsec": self.date_nsec,
               "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000, "id": self.id,
               "vm-state-size": self.vm_state_size}
        if self.icount is not None:
            out = {"icount": self.icount, **out}
        return out


def read_table(image: Qcow2Image) -> tuple[list[Snapshot], int]:
    """(snapshots, table length in bytes) of an open Qcow2Image; DiskFormatError if the
    table runs past the file or QEMU's size limits."""
    h = image.header
    path = image.path
    snapshots: list[Snapshot] = []
    offset = h.snapshots_offset
    for index in range(h.nb_snapshots):
        where = f"snapshot {index} entry"
        if offset - h.snapshots_offset > MAX_TABLE_BYTES:
            raise DiskFormatError(path, "snapshots_offset", 64, "snapshot table is larger "
                                  "than QEMU's 64 MiB limit")
        raw = image.read_metadata(offset, _ENTRY.size, where)
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock,
         vm_state, extra) = _ENTRY.unpack(raw)
        if extra > MAX_EXTRA:
            raise DiskFormatError(path, where, offset + 36, f"extra data size {extra} is "
                                  f"above {MAX_EXTRA}")
        length = _ENTRY.size + extra + id_size + name_size
        if offset + length > image.file_size:
            raise DiskFormatError(path, where, offset, "snapshot entry runs past the end of "
                                  "the file")
        body = image.read_metadata(offset + _ENTRY.size, extra + id_size + name_size, where)
        large = body[:extra]
        if len(large) >= 8:
            vm_state = int.from_bytes(large[:8], "big")
        icount = int.from_bytes(large[16:24], "big") if len(large) >= 24 else None
        if icount == (1 << 64) - 1:
            icount = None
        if l1_size * 8 > C.MAX_L1_BYTES:
            raise DiskFormatError(path, where, offset + 8, f"L1 size {l1_size} is above "
                                  "QEMU's 32 MiB L1 limit")
        if l1_offset & (image.cluster_size - 1):
            raise DiskFormatError(path, where, offset, f"L1 table offset {l1_offset:#x} is not "
                                  "cluster aligned")
        if l1_size and l1_offset + l1_size * 8 > image.file_size:
            raise DiskFormatError(path, where, offset, f"L1 table {l1_offset:#x} (+{l1_size} "
                                  "entries) runs past the end of the file")
        snapshots.append(Snapshot(
            index, offset, l1_offset, l1_size,
            body[extra:extra + id_size].decode("utf-8", "replace"),
            body[extra + id_size:].decode("utf-8", "replace"),
            date_sec, date_nsec, vm_clock, vm_state, icount))
        offset += length + (-length % 8)
    return snapshots, offset - h.snapshots_offset
