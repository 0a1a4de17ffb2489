"""virtio-console: bytes between a Unix-socket client and the guest's hvc0 queues, served by
the real worker thread."""

from __future__ import annotations

import os
import select
import socket

import pytest

from vmctl.memory import GuestMemory
from vmctl.virtio import mmio
from vmctl.virtio.console import ConsoleDevice
from vmctl.virtio.device import F_VERSION_1
from vmctl.virtio.driver import MmioDriver, QueueDriver
from vmctl.virtio.worker import DeviceWorker


class Irq:
    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def __call__(self) -> None:
        os.eventfd_write(self.fd, 1)

    def wait_for(self, condition, timeout: float = 30) -> bool:
        """Wait for interrupts until `condition()` holds (no timing is asserted)."""
        while not condition():
            if not select.select([self.fd], [], [], timeout)[0]:
                return False
            os.eventfd_read(self.fd)
        return True


@pytest.fixture
def rig(tmp_path):
    memory = GuestMemory([(0, 4 << 20)])
    irq = Irq()
    path = str(tmp_path / "hvc0.sock")
    transport = mmio.VirtioMmioTransport(ConsoleDevice(path), memory, irq)
    worker = DeviceWorker(transport, "console-test")
    worker.start()
    driver = MmioDriver(transport)
    assert driver.negotiate(F_VERSION_1) & mmio.FEATURES_OK
    rx, tx = QueueDriver(memory, 0x100000, 16), QueueDriver(memory, 0x200000, 16)
    driver.setup_queue(0, rx)
    driver.setup_queue(1, tx)
    driver.driver_ok()
    yield path, driver, rx, tx, irq, memory
    worker.stop()
    transport.close()
    memory.close()
    os.close(irq.fd)


def test_bytes_flow_both_ways(rig):
    path, driver, rx, tx, irq, memory = rig
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.settimeout(30)
    posted = rx.post([], [64])
    driver.kick(0)
    client.sendall(b"echo hi\n")
    used = []
    assert irq.wait_for(lambda: used.extend(rx.take_used()) or used)
    assert used == [(posted.head, 8)]
    assert memory.read(posted.writable[0][0], 8) == b"echo hi\n"
    tx.post([b"hi", b"\n"], [])
    driver.kick(1)
    assert client.recv(16) == b"hi\n"
    client.close()


def test_socket_is_removed_on_close(tmp_path):
    path = str(tmp_path / "c.sock")
    device = ConsoleDevice(path)
    assert os.path.exists(path)
    device.close()
    assert not os.path.exists(path)
