"""virtio-blk's iovec path: a Linux-shaped request (one indirect table of header, data pages,
status byte) goes to a raw file as an iovec array made from the table itself; the same
requests on qcow2 (views) and on a file that shrank give the same bytes as the file."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from vmctl.disk.qcow2.create import create
from vmctl.memory import GuestMemory
from vmctl.virtio import blk, mmio
from vmctl.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1
from vmctl.virtio.driver import MmioDriver, QueueDriver

pytestmark = pytest.mark.unit

DISK_SIZE = 4 << 20
PAGE = 4096


class Guest:
    def __init__(self, path: Path) -> None:
        self.memory = GuestMemory([(0, 32 << 20)])
        self.device = blk.BlkDevice(blk.open_disk(str(path)), "iov")
        self.transport = mmio.VirtioMmioTransport(self.device, self.memory, lambda: None)
        driver = MmioDriver(self.transport)
        assert driver.negotiate(F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX) & mmio.FEATURES_OK
        self.queue = QueueDriver(self.memory, 0x100000, 64, data_size=16 << 20)
        driver.setup_queue(0, self.queue)
        driver.driver_ok()

    def request(self, kind: int, sector: int, pages: list[bytes] | int) -> tuple[int, list[bytes]]:
        """(status, data pages) of one request shaped as Linux sends it."""
        header = struct.pack("<IIQ", kind, 0, sector)
        if kind == blk.T_IN:
            posted = self.queue.post([header], [PAGE] * pages + [1], indirect=True)  # type: ignore[operator]
        else:
            posted = self.queue.post([header, *pages], [1], indirect=True)  # type: ignore[list-item]
        self.transport.process_queue(0)
        assert [head for head, _ in self.queue.take_used()] == [posted.head]
        status_address = posted.writable[-1][0]
        return self.memory.read(status_address, 1)[0], [self.memory.read(a, n) for a, n in posted.writable[:-1]]

    def close(self) -> None:
        self.transport.close()
        self.memory.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_linux_shaped_reads_and_writes_move_the_right_bytes(tmp_path: Path, fmt: str):
    path = tmp_path / f"disk.{fmt}"
    if fmt == "raw":
        path.write_bytes(os.urandom(DISK_SIZE))
    else:
        create(str(path), DISK_SIZE)
    guest = Guest(path)
    backend, calls = guest.device.backend, []
    for name in ("readinto_iovecs", "write_iovecs"):  # record which path served the data
        method = getattr(backend, name)
        setattr(backend, name, lambda offset, iovecs, method=method, name=name: calls.append(name) or method(offset, iovecs))
    try:
        pages = [os.urandom(PAGE) for _ in range(37)]
        assert guest.request(blk.T_OUT, 24, pages)[0] == blk.S_OK
        status, read = guest.request(blk.T_IN, 16, 40)  # 1 page before the write, 2 after
        assert status == blk.S_OK
        assert read[1:38] == pages
        guest.device.backend.flush()
        expected = guest.device.backend.read(16 * 512, 40 * PAGE)
        assert b"".join(read) == expected
        status, _ = guest.request(blk.T_IN, DISK_SIZE // 512 - 1, 1)  # past the end: refused
        assert status == blk.S_IOERR
        assert calls == ["write_iovecs", "readinto_iovecs"]  # both formats get Linux's tables as iovecs
    finally:
        guest.close()
    if fmt == "raw":
        assert path.read_bytes()[24 * 512 : 24 * 512 + 37 * PAGE] == b"".join(pages)


def test_a_file_that_shrank_reads_as_zeros_past_its_end(tmp_path: Path):
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK_SIZE))
    guest = Guest(path)
    try:
        os.truncate(path, DISK_SIZE - PAGE - 512)  # the device still believes in the old size
        status, read = guest.request(blk.T_IN, DISK_SIZE // 512 - 16, 2)
        assert status == blk.S_OK
        tail = DISK_SIZE - 2 * PAGE
        assert read[0][:PAGE - 512] == path.read_bytes()[tail:]
        assert read[0][PAGE - 512 :] == bytes(512) and read[1] == bytes(PAGE)
    finally:
        guest.close()


def test_descriptor_entries_become_struct_iovecs():
    entries = struct.pack("<QIHH", 0x1000, 4096, 0xFFFF, 0xFFFF) + struct.pack("<QIHH", 0x7000, 0xFFFFFFFF, 3, 2)
    delta = 0x7F00_0000_0000
    packed = blk._as_iovecs(entries, delta)
    assert packed is not None
    assert struct.unpack("<QQQQ", packed) == (0x1000 + delta, 4096, 0x7000 + delta, 0xFFFFFFFF)
    assert blk._as_iovecs(entries, -1) is None  # a negative offset would borrow across fields
