"""The virtio-mmio transport driven register by register, as a guest driver would."""

from __future__ import annotations

import logging
import os
import select
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmctl.memory import GuestMemory
from vmctl.virtio import mmio
from vmctl.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1
from vmctl.virtio.driver import MmioDriver, QueueDriver
from vmctl.virtio.rng import RngDevice
from vmctl.virtio.worker import DeviceWorker

QUEUE_BASE = 0x40000


class Irq:
    """An interrupt line backed by a real eventfd, like the irqfd in a VM."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.count = 0

    def __call__(self) -> None:
        self.count += 1
        os.eventfd_write(self.fd, 1)

    def wait(self, timeout: float = 30) -> bool:
        return bool(select.select([self.fd], [], [], timeout)[0])


@pytest.fixture
def memory():
    mem = GuestMemory([(0, 4 << 20)])
    yield mem
    mem.close()


@pytest.fixture
def rig(memory):
    irq = Irq()
    transport = mmio.VirtioMmioTransport(RngDevice(), memory, irq)
    yield transport, MmioDriver(transport), irq
    transport.close()
    os.close(irq.fd)


def bring_up(driver: MmioDriver, memory, features=None, size=16) -> QueueDriver:
    status = driver.negotiate(F_VERSION_1 if features is None else features)
    assert status & mmio.FEATURES_OK
    queue = QueueDriver(memory, QUEUE_BASE, size)
    driver.setup_queue(0, queue)
    driver.driver_ok()
    return queue


def test_identity_registers(rig):
    _, driver, _ = rig
    assert driver.read(mmio.MAGIC_VALUE) == 0x74726976
    assert driver.read(mmio.VERSION_REG) == 2
    assert driver.read(mmio.DEVICE_ID) == 4
    assert driver.read(mmio.QUEUE_NUM_MAX) == 256
    driver.write(mmio.QUEUE_SEL, 5)
    assert driver.read(mmio.QUEUE_NUM_MAX) == 0  # no such queue
    assert driver.read(mmio.SHM_LEN_LOW) == 0xFFFFFFFF


def test_offered_features_include_version_1_indirect_and_event_idx(rig):
    _, driver, _ = rig
    features = driver.device_features()
    assert features & F_VERSION_1 and features & F_INDIRECT_DESC and features & F_EVENT_IDX


@pytest.mark.parametrize("features", [0, F_INDIRECT_DESC, F_VERSION_1 | 1 << 40, F_VERSION_1 | 1 << 3])
def test_features_ok_refused_for_legacy_or_unoffered_features(rig, features):
    _, driver, _ = rig
    assert not driver.negotiate(features) & mmio.FEATURES_OK


def test_driver_features_frozen_after_features_ok(rig):
    transport, driver, _ = rig
    driver.negotiate(F_VERSION_1)
    driver.write(mmio.DRIVER_FEATURES_SEL, 0)
    driver.write(mmio.DRIVER_FEATURES, F_EVENT_IDX)
    assert transport.driver_features == F_VERSION_1


def test_status_bits_only_grow_and_driver_ok_needs_features_ok(rig):
    transport, driver, _ = rig
    driver.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER)
    driver.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.DRIVER_OK)
    assert driver.read(mmio.STATUS) == mmio.ACKNOWLEDGE | mmio.DRIVER
    driver.write(mmio.STATUS, mmio.ACKNOWLEDGE)
    assert driver.read(mmio.STATUS) == mmio.ACKNOWLEDGE | mmio.DRIVER
    driver.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.DEVICE_NEEDS_RESET)
    assert not driver.read(mmio.STATUS) & mmio.DEVICE_NEEDS_RESET


def test_queue_registers_ignored_before_features_ok(rig, memory):
    transport, driver, _ = rig
    driver.write(mmio.QUEUE_NUM, 8)
    driver.write(mmio.QUEUE_DESC_LOW, QUEUE_BASE)
    assert transport.queues[0].size == 256 and transport.queues[0].desc_table == 0


def test_request_completes_with_interrupt_and_ack(rig, memory):
    transport, driver, irq = rig
    queue = bring_up(driver, memory)
    posted = queue.post([], [32])
    transport.process_queue(0)
    assert queue.take_used() == [(posted.head, 32)]
    assert irq.count == 1
    assert driver.read(mmio.INTERRUPT_STATUS) == mmio.INT_USED_BUFFER
    driver.write(mmio.INTERRUPT_ACK, mmio.INT_USED_BUFFER)
    assert driver.read(mmio.INTERRUPT_STATUS) == 0


def test_queue_notify_through_an_mmio_exit_wakes_the_queue_eventfd(rig, memory):
    transport, driver, _ = rig
    bring_up(driver, memory)
    os.eventfd_read(transport.notify_fds[0])  # DRIVER_OK's own wake-up
    driver.kick(0)
    assert transport.trapped_notifies == 1
    assert os.eventfd_read(transport.notify_fds[0]) == 1


def test_bad_queue_layout_sets_needs_reset_and_logs_once(rig, memory, caplog):
    transport, driver, irq = rig
    driver.negotiate(F_VERSION_1)
    for _ in range(2):
        driver.write(mmio.QUEUE_NUM, 16)
        driver.write(mmio.QUEUE_DESC_LOW, 0xD000_0000)  # device memory, not RAM
        driver.write(mmio.QUEUE_READY, 1)
    assert driver.read(mmio.STATUS) & mmio.DEVICE_NEEDS_RESET
    assert driver.read(mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG_CHANGE and irq.count >= 1
    assert len([r for r in caplog.records if "needs reset" in r.getMessage()]) == 1
    assert not transport.queues[0].ready


def test_looping_chain_needs_reset_and_a_reset_recovers(rig, memory, caplog):
    caplog.set_level(logging.WARNING)
    transport, driver, _ = rig
    queue = bring_up(driver, memory)
    memory.write(queue.desc, struct.pack("<QIHH", queue.data, 16, 1 | 2, 0))  # NEXT|WRITE -> itself
    queue.publish(0)
    transport.process_queue(0)
    transport.process_queue(0)
    assert driver.read(mmio.STATUS) & mmio.DEVICE_NEEDS_RESET
    assert queue.take_used() == []
    assert len([r for r in caplog.records if "loops" in r.getMessage()]) == 1
    queue = bring_up(driver, memory)  # the driver resets and starts over
    assert driver.read(mmio.STATUS) == 0xF
    posted = queue.post([], [8])
    transport.process_queue(0)
    assert queue.take_used() == [(posted.head, 8)]


def test_event_idx_suppresses_interrupts_until_used_event(rig, memory):
    transport, driver, irq = rig
    queue = bring_up(driver, memory, features=F_VERSION_1 | F_EVENT_IDX)
    queue.post([], [4])
    transport.process_queue(0)
    assert irq.count == 1
    assert queue.avail_event() == 1  # "kick me for the next buffer"
    queue.set_used_event(5)
    queue.post([], [4])
    transport.process_queue(0)
    assert irq.count == 1  # used idx 2 has not passed 5
    for _ in range(4):
        queue.post([], [4])
    transport.process_queue(0)
    assert irq.count == 2


def test_worker_thread_serves_kicks(rig, memory):
    transport, driver, irq = rig
    worker = DeviceWorker(transport, "test-worker")
    worker.start()
    try:
        queue = bring_up(driver, memory)
        posted = queue.post([], [64], indirect=False)
        driver.kick(0)
        assert irq.wait(), "no interrupt from the worker"
        assert queue.take_used() == [(posted.head, 64)]
    finally:
        worker.stop()
    assert not worker.thread.is_alive()


def test_config_space_reads_past_the_end_are_zero(rig):
    transport, _, _ = rig
    assert transport.read(mmio.CONFIG, 4) == b"\0\0\0\0"
    assert transport.read(0x0FF0, 1) == b"\0"


# --- fuzz: any register traffic plus garbage rings never raises out of the transport ----------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    accesses=st.lists(
        st.tuples(st.sampled_from(range(0, 0x110, 4)), st.integers(0, 2**32 - 1), st.booleans()),
        max_size=60,
    ),
    garbage=st.binary(min_size=64, max_size=512),
)
def test_fuzz_register_traffic_never_escapes(rig, memory, accesses, garbage):
    transport, driver, _ = rig
    memory.write(QUEUE_BASE, garbage * (0x3000 // len(garbage) + 1))  # rings full of noise
    for offset, value, is_write in accesses:
        if offset in (mmio.QUEUE_DESC_LOW, mmio.QUEUE_DRIVER_LOW, mmio.QUEUE_DEVICE_LOW) and value % 2:
            value = QUEUE_BASE + (value % 0x2000)  # sometimes point queues into the noise
        if is_write:
            driver.write(offset, value)
        else:
            driver.read(offset)
        transport.process_queue(0)
    driver.write(mmio.STATUS, 0)
    assert driver.read(mmio.STATUS) == 0


class KernelServedRng(RngDevice):
    """An rng whose queues a (pretend) host kernel takes at DRIVER_OK, as vhost-net does.
    What the kernel would do is vhost's business; here: what the transport does around it."""

    def __init__(self) -> None:
        super().__init__()
        self.handoffs: list = []
        self.resets = 0

    def offload(self, features, memory, queues) -> bool:
        self.handoffs = queues
        return True

    def reset(self) -> None:
        self.resets += 1


def test_queues_handed_to_the_kernel_are_left_alone_until_reset(memory):
    irq = Irq()
    device = KernelServedRng()
    transport = mmio.VirtioMmioTransport(device, memory, irq, irq_fd=irq.fd)
    worker = DeviceWorker(transport, "test-worker")
    driver = MmioDriver(transport)
    try:
        queue = bring_up(driver, memory)
        [handoff] = device.handoffs
        assert (handoff.queue, handoff.kick_fd, handoff.call_fd) == (transport.queues[0], transport.notify_fds[0], irq.fd)
        assert transport.kernel_queues and transport.notify_fds[0] not in worker._handlers  # the kernel waits on it
        # The kernel interrupts through the irqfd without touching InterruptStatus: it reads as used-buffer.
        assert driver.read(mmio.INTERRUPT_STATUS) == mmio.INT_USED_BUFFER
        queue.post([], [32])
        transport.process_queue(0)  # a stray wake-up: the transport must not serve the kernel's queue
        assert queue.take_used() == [] and irq.count == 0

        resets = device.resets
        driver.write(mmio.STATUS, 0)  # reset: the device takes its queues back
        assert device.resets == resets + 1 and not transport.kernel_queues
        assert worker._handlers[transport.notify_fds[0]] == ("queue", 0)
        assert driver.read(mmio.INTERRUPT_STATUS) == 0
    finally:
        worker.stop()
        transport.close()
        os.close(irq.fd)


def test_no_irqfd_no_handoff(memory):
    device = KernelServedRng()
    transport = mmio.VirtioMmioTransport(device, memory, Irq())
    try:
        bring_up(MmioDriver(transport), memory)
        assert device.handoffs == [] and not transport.kernel_queues
    finally:
        transport.close()
