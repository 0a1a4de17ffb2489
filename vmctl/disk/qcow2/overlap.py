"""Which host clusters hold metadata, so no write lands on one by mistake (QEMU's overlap
checks, "all" mode minus inactive L2 tables).

A writable image records every metadata cluster when it opens (header, L1 table, refcount
table, refcount blocks, active L2 tables, snapshot table and snapshot L1 tables, bitmap
directory) and keeps the map current as tables are allocated or moved. Every write names
what it is allowed to overwrite; anything else is a corruption of the image: the write is
refused and the image marked corrupt (`Qcow2Image.signal_corruption`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

HEADER = "the image header"
L1 = "the active L1 table"
REFTABLE = "the refcount table"
REFBLOCK = "a refcount block"
L2 = "an active L2 table"
SNAPSHOT_TABLE = "the snapshot table"
SNAPSHOT_L1 = "an inactive L1 table"
BITMAP_DIRECTORY = "the bitmap directory"
DATA = "guest data"


@dataclass
class MetadataMap:
    cluster_bits: int
    # cluster index -> what lives there; a second claimant goes to `extra` (a corrupt image)
    owner: dict[int, str] = field(default_factory=dict)
    extra: dict[int, set[str]] = field(default_factory=dict)

    def add(self, offset: int, length: int, kind: str) -> None:
        for cluster in self._clusters(offset, length):
            current = self.owner.get(cluster)
            if current is None:
                self.owner[cluster] = kind
            elif current != kind or kind in (L2, REFBLOCK):  # two tables in one cluster
                self.extra.setdefault(cluster, set()).add(kind)

    def remove(self, offset: int, length: int, kind: str) -> None:
        for cluster in self._clusters(offset, length):
            others = self.extra.get(cluster)
            if others and kind in others:
                others.discard(kind)
                if not others:
                    del self.extra[cluster]
            elif self.owner.get(cluster) == kind:
                if others:
                    self.owner[cluster] = others.pop()
                    if not others:
                        del self.extra[cluster]
                else:
                    del self.owner[cluster]

    def kind_of(self, cluster: int) -> str | None:
        return self.owner.get(cluster)

    def conflict(self, offset: int, length: int, allowed: str) -> str | None:
        """What a write of `length` bytes at `offset` would destroy, or None if it may go
        ahead. `allowed` is what the write itself is (DATA for guest data)."""
        owner = self.owner
        for cluster in self._clusters(offset, length):
            kind = owner.get(cluster)
            if kind is None:
                continue
            if kind != allowed:
                return kind
            others = self.extra.get(cluster)
            if others:
                return next(iter(others))
        return None

    def _clusters(self, offset: int, length: int) -> range:
        if length <= 0:
            return range(0)
        return range(offset >> self.cluster_bits, ((offset + length - 1) >> self.cluster_bits) + 1)
