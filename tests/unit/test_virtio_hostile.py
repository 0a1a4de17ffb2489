"""Hostile drivers: the virtqueue cases issue 19 lists, each against the real walker and
devices. The rule (virtio 1.1 "device needs reset"): a broken queue or request stops that
device with DEVICE_NEEDS_RESET, never the VMM, and nothing outside guest RAM is touched."""

from __future__ import annotations

import struct

import pytest

from vmctl.memory import GuestMemory
from vmctl.virtio import blk, mmio
from vmctl.virtio.device import F_INDIRECT_DESC, F_VERSION_1
from vmctl.virtio.driver import MmioDriver, QueueDriver
from vmctl.virtio.queue import DESC_F_NEXT, DESC_F_WRITE, QueueError, Virtqueue
from vmctl.virtio.rng import RngDevice

BASE = 0x40000


@pytest.fixture
def memory():
    mem = GuestMemory([(0, 4 << 20), (6 << 20, 2 << 20)])  # a hole at 4..6 MiB
    yield mem
    mem.close()


def queue_on(memory, driver: QueueDriver) -> Virtqueue:
    queue = Virtqueue(memory, 256)
    queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = \
        driver.size, driver.desc, driver.avail, driver.used
    queue.activate(event_idx=False, indirect=True)
    return queue


def put_desc(memory, table, index, address, length, flags, nxt=0):
    memory.write(table + 16 * index, struct.pack("<QIHH", address, length, flags, nxt))


def publish(memory, driver: QueueDriver, heads: list[int], idx: int) -> None:
    for n, head in enumerate(heads):
        memory.write(driver.avail + 4 + 2 * (n % driver.size), struct.pack("<H", head))
    memory.write(driver.avail + 2, struct.pack("<H", idx & 0xFFFF))


def test_available_index_moving_backwards_is_refused(memory):
    driver = QueueDriver(memory, BASE, 8)
    queue = queue_on(memory, driver)
    driver.post([b"x"], [])
    assert queue.pop() is not None
    publish(memory, driver, [0], 0)  # the driver decrements avail->idx from 1 to 0
    with pytest.raises(QueueError, match="ahead"):
        queue.pop()


def test_queue_size_zero_is_refused(memory):
    driver = QueueDriver(memory, BASE, 8)
    queue = Virtqueue(memory, 256)
    queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = 0, driver.desc, \
        driver.avail, driver.used
    with pytest.raises(QueueError, match="size 0"):
        queue.activate(event_idx=False, indirect=False)


def test_buffer_crossing_from_ram_into_the_hole_is_refused(memory):
    driver = QueueDriver(memory, BASE, 8)
    queue = queue_on(memory, driver)
    put_desc(memory, driver.desc, 0, (4 << 20) - 512, 1024, 0)  # ends in the hole
    publish(memory, driver, [0], 1)
    with pytest.raises(QueueError, match="outside guest RAM"):
        queue.pop()
    put_desc(memory, driver.desc, 1, (6 << 20) - 512, 1024, 0)  # starts in the hole
    publish(memory, driver, [0, 1], 2)
    queue.last_avail = 1
    with pytest.raises(QueueError, match="outside guest RAM"):
        queue.pop()


@pytest.mark.parametrize("used_at", ["desc", "avail"])
def test_used_ring_overlapping_another_ring_is_refused(memory, used_at):
    driver = QueueDriver(memory, BASE, 8)
    queue = Virtqueue(memory, 256)
    queue.size, queue.desc_table, queue.avail_ring = 8, driver.desc, driver.avail
    queue.used_ring = driver.desc + 16 if used_at == "desc" else driver.avail
    with pytest.raises(QueueError, match="overlaps"):
        queue.activate(event_idx=False, indirect=False)


def test_writable_buffer_aliasing_the_rings_only_hurts_the_guest(memory):
    """An rng request whose buffer covers the available ring: the device overwrites the
    ring with random bytes; the next look at the ring fails cleanly (needs reset)."""
    device = RngDevice()
    transport = mmio.VirtioMmioTransport(device, memory, lambda: None)
    try:
        control = MmioDriver(transport)
        assert control.negotiate(F_VERSION_1) & mmio.FEATURES_OK
        driver = QueueDriver(memory, BASE, 8)
        control.setup_queue(0, driver)
        control.driver_ok()
        for round in range(20):
            put_desc(memory, driver.desc, round % 8, driver.avail, 6 + 2 * 8, DESC_F_WRITE)
            publish(memory, driver, [round % 8], round + 1)
            transport.process_queue(0)
            if transport.status & mmio.DEVICE_NEEDS_RESET:
                break
    finally:
        transport.close()


def test_chain_longer_than_32_bits_is_summed_exactly(memory):
    """4096 descriptors naming the same 2 MiB buffer: 8 GiB in all. A 32-bit sum would wrap
    to 0; the walker's is exact, so a device compares the true length with its limits."""
    size, big = 4096, 2 << 20
    desc, avail, used = 0x40000, 0x50000, 0x60000
    for index in range(size):
        last = index == size - 1
        put_desc(memory, desc, index, 1 << 20, big, 0 if last else DESC_F_NEXT, index + 1)
    memory.write(avail, struct.pack("<HHH", 0, 1, 0))
    queue = Virtqueue(memory, size)
    queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = size, desc, avail, used
    queue.activate(event_idx=False, indirect=False)
    chain = queue.pop()
    assert chain.readable_length == size * big == 8 << 30


def _blk_rig(memory, tmp_path):
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(1 << 20))
    device = blk.open_block_device(str(path))
    transport = mmio.VirtioMmioTransport(device, memory, lambda: None)
    control = MmioDriver(transport)
    assert control.negotiate(F_VERSION_1 | F_INDIRECT_DESC) & mmio.FEATURES_OK
    driver = QueueDriver(memory, BASE, 64, data_size=1 << 20)
    control.setup_queue(0, driver)
    control.driver_ok()
    return transport, driver, path


@pytest.mark.parametrize("kind", [blk.T_IN, blk.T_OUT])
def test_blk_data_in_the_wrong_direction_is_an_io_error(memory, tmp_path, kind):
    transport, driver, path = _blk_rig(memory, tmp_path)
    try:
        header = struct.pack("<IIQ", kind, 0, 0)
        if kind == blk.T_IN:  # a read whose data buffer is device-readable
            posted = driver.post([header, b"\xaa" * 512], [1])
        else:  # a write whose data buffer is device-writable
            posted = driver.post([header], [512, 1])
        transport.process_queue(0)
        (head, used), = driver.take_used()
        status_address = posted.writable[-1][0]
        assert memory.read(status_address, 1)[0] == blk.S_IOERR
        assert path.read_bytes() == bytes(1 << 20)
    finally:
        transport.close()


def test_blk_zero_length_descriptors_are_harmless(memory, tmp_path):
    transport, driver, path = _blk_rig(memory, tmp_path)
    try:
        header = struct.pack("<IIQ", blk.T_OUT, 0, 1)
        posted = driver.post([header, b"", b"\x5a" * 512, b""], [0, 1])
        transport.process_queue(0)
        assert driver.take_used()
        assert memory.read(posted.writable[-1][0], 1)[0] == blk.S_OK
        assert path.read_bytes()[512:1024] == b"\x5a" * 512
        assert not transport.status & mmio.DEVICE_NEEDS_RESET
    finally:
        transport.close()
