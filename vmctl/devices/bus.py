"""Port I/O and MMIO buses: address ranges → devices, with unowned accesses reported once."""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    device: BusDevice

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Ranges never overlap; lookups are a binary search. Registration happens before vCPUs run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._bases: list[int] = []
        self._ranges: list[BusRange] = []
        self._unhandled: dict[tuple[str, int], int] = {}
        self._unhandled_lock = threading.Lock()

    def register(self, base: int, length: int, device: BusDevice) -> None:
        index = bisect.bisect_right(self._bases, base)
        new = BusRange(base, length, device)
        if index > 0 and self._ranges[index - 1].end > base or (
            index < len(self._ranges) and self._ranges[index].base < new.end
        ):
            raise ValueError(f"{self.name} range 0x{base:x}+0x{length:x} overlaps a registered device")
        self._bases.insert(index, base)
        self._ranges.insert(index, new)

    def find(self, address: int) -> BusRange | None:
        index = bisect.bisect_right(self._bases, address) - 1
        if index >= 0 and address < self._ranges[index].end:
            return self._ranges[index]
        return None

    def read(self, address: int, size: int) -> bytes:
        found = self.find(address)
        if found is None:
            self._report_unhandled("read", address, size)
            return b"\xff" * size  # what a read from an empty bus returns on real hardware
        return found.device.read(address - found.base, size)

    def write(self, address: int, data: bytes) -> None:
        found = self.find(address)
        if found is None:
            self._report_unhandled("write", address, len(data))
            return
        found.device.write(address - found.base, data)

    def _report_unhandled(self, kind: str, address: int, size: int) -> None:
        key = (kind, address)
        with self._unhandled_lock:
            count = self._unhandled.get(key, 0)
            self._unhandled[key] = count + 1
        if count == 0:
            log.info("%s: guest %s of %d byte(s) at 0x%x: no device there (reported once)", self.name, kind, size, address)

    @property
    def unhandled(self) -> dict[tuple[str, int], int]:
        """(kind, address) -> how many times the guest touched it."""
        with self._unhandled_lock:
            return dict(self._unhandled)
