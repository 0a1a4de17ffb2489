"""virtio-blk batching, parallel large requests, flush ordering and multi-queue, driven
through the real transport and a raw disk file (no mocks of the data path)."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from vmctl.memory import GuestMemory
from vmctl.virtio import blk, mmio
from vmctl.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1
from vmctl.virtio.driver import MmioDriver, QueueDriver

DISK_SIZE = 8 << 20
QUEUE = 64
LARGE = 128 << 10


@pytest.fixture
def disk_file(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


class Rig:
    """A guest with `queues` request queues on one blk device, 64 entries each."""

    def __init__(self, device: blk.BlkDevice, queues: int = 1, features: int = F_VERSION_1 | F_INDIRECT_DESC):
        self.memory = GuestMemory([(0, 64 << 20)])
        self.irqs = 0
        self.device = device
        self.transport = mmio.VirtioMmioTransport(device, self.memory, self._irq)
        self.driver = MmioDriver(self.transport)
        assert self.driver.negotiate(features | (blk.F_MQ if queues > 1 else 0)) & mmio.FEATURES_OK
        self.queues = [QueueDriver(self.memory, 0x100000 + index * (12 << 20), QUEUE, data_size=11 << 20)
                       for index in range(queues)]
        for index, queue in enumerate(self.queues):
            self.driver.setup_queue(index, queue)
        self.driver.driver_ok()

    def _irq(self) -> None:
        self.irqs += 1

    def close(self) -> None:
        self.transport.close()
        self.memory.close()


@pytest.fixture
def rig(disk_file):
    rigs = []

    def make(queues: int = 1, pool_threads: int = 4, **kwargs) -> Rig:
        device = blk.BlkDevice(blk.open_disk(str(disk_file)), "batch", queues)
        device.pool_threads = pool_threads  # whatever this host's CPU count: the pool is under test
        made = Rig(device, queues, **kwargs)
        rigs.append(made)
        return made

    yield make
    for made in rigs:
        made.close()


def header(kind: int, sector: int) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def post_read(queue: QueueDriver, sector: int, length: int):
    return queue.post([header(blk.T_IN, sector)], [length, 1], indirect=True)


def test_a_flooded_queue_is_served_in_one_batch_with_one_interrupt(rig, disk_file):
    """The guest fills the whole ring (large and small reads, writes) before one kick."""
    made = rig()
    queue = made.queues[0]
    disk = bytearray(disk_file.read_bytes())
    posted = []
    for index in range(QUEUE):
        sector = index * (LARGE // 512)
        if index % 4 == 3:  # a large write of a known pattern
            data = bytes([index]) * LARGE
            posted.append(("write", queue.post([header(blk.T_OUT, sector), data], [1], indirect=True), sector, data))
            disk[sector * 512 : sector * 512 + LARGE] = data
        else:
            length = LARGE if index % 2 else 4096
            posted.append(("read", post_read(queue, sector, length), sector, length))
    made.transport.process_queue(0)
    used = dict(queue.take_used())
    assert len(used) == QUEUE and made.irqs == 1
    assert made.device._pool is not None  # several large requests: the pool took part
    for kind, chain, sector, extra in posted:
        status = made.memory.read(chain.writable[-1][0], 1)
        assert status == bytes([blk.S_OK])
        if kind == "read":
            address, length = chain.writable[0]
            assert used[chain.head] == extra + 1
            assert made.memory.read(address, length) == bytes(disk[sector * 512 : sector * 512 + length])
        else:
            assert used[chain.head] == 1
    made.device.backend.flush()
    assert disk_file.read_bytes() == bytes(disk)


def test_without_spare_cpus_a_batch_is_served_in_order_without_a_pool(rig, disk_file):
    made = rig(pool_threads=0)
    queue = made.queues[0]
    disk = disk_file.read_bytes()
    chains = [post_read(queue, index * (LARGE // 512), LARGE) for index in range(8)]
    made.transport.process_queue(0)
    assert len(queue.take_used()) == 8 and made.irqs == 1 and made.device._pool is None
    for index, chain in enumerate(chains):
        start = index * LARGE
        assert made.memory.read(chain.writable[0][0], LARGE) == disk[start : start + LARGE]


def test_the_pool_is_sized_by_the_cpus_left_over(disk_file, monkeypatch):
    monkeypatch.setattr(blk.os, "cpu_count", lambda: 2)
    device = blk.open_block_device(str(disk_file))
    try:
        device.fit_machine(1)
        assert device.pool_threads == 0  # 2 CPUs: the vCPU and the worker
        monkeypatch.setattr(blk.os, "cpu_count", lambda: 16)
        device.fit_machine(2)
        assert device.pool_threads == blk.POOL_THREADS
    finally:
        device.close()


def test_a_single_large_request_stays_on_the_worker_thread(rig):
    made = rig()
    post_read(made.queues[0], 0, LARGE)
    made.transport.process_queue(0)
    assert len(made.queues[0].take_used()) == 1 and made.device._pool is None


def test_a_flush_waits_for_the_writes_posted_before_it(rig, disk_file):
    made = rig()
    backend = made.device.backend
    finished: list[str] = []
    write, flush = backend.write_iovecs, backend.flush  # a raw disk takes Linux-shaped writes as iovecs

    def slow_write(offset, buffers):
        time.sleep(0.05)  # a slow disk: the flush must still come after it
        result = write(offset, buffers)
        finished.append(f"write@{offset}")
        return result

    def checked_flush():
        finished.append("flush")
        flush()

    backend.write_iovecs, backend.flush = slow_write, checked_flush
    queue = made.queues[0]
    for index in range(3):
        queue.post([header(blk.T_OUT, index * (LARGE // 512)), bytes([index + 1]) * LARGE], [1], indirect=True)
    queue.post([header(blk.T_FLUSH, 0)], [1])
    made.transport.process_queue(0)
    assert len(queue.take_used()) == 4
    assert finished[-1] == "flush" and sorted(finished[:-1]) == [f"write@{i * LARGE}" for i in range(3)]


def test_a_broken_request_in_a_batch_resets_the_device_and_leaves_no_io_running(rig):
    made = rig()
    queue = made.queues[0]
    for index in range(4):
        post_read(queue, index * (LARGE // 512), LARGE)
    queue.post([header(blk.T_IN, 0)], [])  # nothing writable, no status byte: the driver broke the rules
    made.transport.process_queue(0)
    assert made.driver.read(mmio.STATUS) & mmio.DEVICE_NEEDS_RESET
    assert queue.take_used() == []
    made.device.close()  # joins the pool, if one was made
    assert not [t for t in threading.enumerate() if t.name.startswith("virtio-blk-io")]


def test_multi_queue_offers_mq_and_serves_every_queue(rig, disk_file):
    made = rig(queues=4, features=F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX)
    assert made.device.features & blk.F_MQ
    config = made.transport.read(mmio.CONFIG, 64)
    assert struct.unpack_from("<H", config, 34)[0] == 4  # num_queues
    disk = disk_file.read_bytes()
    chains = [(index, post_read(queue, index * 8, 4096)) for index, queue in enumerate(made.queues)]
    for index in range(4):
        made.transport.process_queue(index)
    for index, chain in chains:
        assert made.queues[index].take_used() == [(chain.head, 4097)]
        assert made.memory.read(chain.writable[0][0], 4096) == disk[index * 4096 : index * 4096 + 4096]


def test_queues_follow_the_vcpus_within_bounds(disk_file):
    device = blk.open_block_device(str(disk_file))
    try:
        assert device.queue_sizes == (blk.QUEUE_SIZE,) and not device.features & blk.F_MQ
        device.fit_machine(3)
        assert len(device.queue_sizes) == 3 and device.features & blk.F_MQ
        device.fit_machine(64)
        assert len(device.queue_sizes) == blk.MAX_QUEUES
        with pytest.raises(ValueError):
            device.set_queues(0)
    finally:
        device.close()
