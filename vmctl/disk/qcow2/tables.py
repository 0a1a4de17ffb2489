"""Big-endian tables as native arrays, and the write-back LRU cache that holds them."""

from __future__ import annotations

import sys
from array import array
from typing import Callable, Generic, Iterator, TypeVar

_SWAP = sys.byteorder == "little"
T = TypeVar("T")


def decode_u64(data: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian u64 table → native array('Q'); one C-level pass, no per-entry Python."""
    table = array("Q")
    table.frombytes(data)
    if _SWAP:
        table.byteswap()
    return table


def encode_u64(table: array[int]) -> bytes:
    if not _SWAP:
        return table.tobytes()
    copy = array("Q", table)
    copy.byteswap()
    return copy.tobytes()


class TableCache(Generic[T]):
    """Cluster-sized tables keyed by host offset, least recently used evicted first.

    Dirty tables are only written by `write_dirty`. Evicting a dirty table would break the
    write ordering, so the owner's `make_clean` (an ordered flush) runs first.
    """

    def __init__(self, capacity: int, load: Callable[[int], T],
                 make_clean: Callable[[], None]) -> None:
        self.capacity = max(capacity, 4)
        self._load = load
        self._make_clean = make_clean
        self._tables: dict[int, T] = {}
        self.dirty: set[int] = set()

    def get(self, offset: int) -> T:
        tables = self._tables
        table = tables.get(offset)
        if table is None:
            table = self._load(offset)
            self._insert(offset, table)
        elif len(tables) >= self.capacity // 2:
            # Only keep exact LRU order once eviction is a possibility: it costs a reinsert.
            del tables[offset]
            tables[offset] = table
        return table

    def put_new(self, offset: int, table: T) -> None:
        self._insert(offset, table)
        self.dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def drop(self, offset: int) -> None:
        self._tables.pop(offset, None)
        self.dirty.discard(offset)

    def dirty_items(self) -> Iterator[tuple[int, T]]:
        for offset in sorted(self.dirty):
            yield offset, self._tables[offset]

    def cached(self, offset: int) -> bool:
        return offset in self._tables

    def _insert(self, offset: int, table: T) -> None:
        if len(self._tables) >= self.capacity:
            victim = next(iter(self._tables))
            if victim in self.dirty:
                self._make_clean()
            self._tables.pop(victim, None)
        self._tables[offset] = table
