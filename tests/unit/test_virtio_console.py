"""virtio-console: bytes between a Unix-socket client and the guest's hvc0 queues, served by
the real worker thread."""

from __future__ import annotations

import base64
import contextlib
import os
import select
import socket
import threading

import pytest

from vmctl.memory import GuestMemory
from vmctl.virtio import mmio
from vmctl.virtio.console import ConsoleDevice
from vmctl.virtio.console_port import ConsolePort
from vmctl.virtio.device import F_VERSION_1
from vmctl.virtio.driver import MmioDriver, QueueDriver
from vmctl.virtio.worker import DeviceWorker
from vmctl.vmm.agent import UART, VIRTIO_CONSOLE, AgentChannel


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


@contextlib.contextmanager
def transport_locked(transport):
    with transport.lock:  # as a snapshot holds it: the worker cannot deliver meanwhile
        yield


def wired(device, memory: GuestMemory, irq: Irq, name: str):
    """The device on virtio-mmio with its worker running, driven to DRIVER_OK with both queues."""
    transport = mmio.VirtioMmioTransport(device, memory, irq)
    worker = DeviceWorker(transport, name)
    worker.start()
    driver = MmioDriver(transport)
    assert driver.negotiate(F_VERSION_1) & mmio.FEATURES_OK
    rx, tx = QueueDriver(memory, 0x100000, 16), QueueDriver(memory, 0x200000, 16)
    driver.setup_queue(0, rx)
    driver.setup_queue(1, tx)
    driver.driver_ok()
    return transport, worker, driver, rx, tx


@pytest.fixture
def rig(tmp_path):
    memory = GuestMemory([(0, 4 << 20)])
    irq = Irq()
    path = str(tmp_path / "hvc0.sock")
    transport, worker, driver, rx, tx = wired(ConsoleDevice(path), memory, irq, "console-test")
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


# --- ConsolePort: the in-process host end the VMM gives its guest agent -----------------------
@pytest.fixture
def port_rig():
    memory = GuestMemory([(0, 4 << 20)])
    irq = Irq()
    output: list[bytes] = []
    port = ConsolePort(output.append, "agent-console")
    transport, worker, driver, rx, tx = wired(port, memory, irq, "port-test")
    yield port, transport, driver, rx, tx, irq, memory, output
    worker.stop()
    transport.close()
    port.close()
    memory.close()
    os.close(irq.fd)


def _receive(driver, rx, irq, memory, size: int = 64) -> bytes:
    posted = rx.post([], [size])
    driver.kick(0)
    used: list[tuple[int, int]] = []
    assert irq.wait_for(lambda: used.extend(rx.take_used()) or used)
    assert used[0][0] == posted.head
    return memory.read(posted.writable[0][0], used[0][1])


def test_port_bytes_wait_for_guest_buffers_and_guest_output_reaches_the_callback(port_rig):
    port, transport, driver, rx, tx, irq, memory, output = port_rig
    port.feed(b"X 1 ")
    port.feed(b"ZWNobw==\n")  # fed before the guest posted anything: kept, not dropped
    assert _receive(driver, rx, irq, memory) == b"X 1 ZWNobw==\n"
    tx.post([b"A ready", b"\n"], [])
    driver.kick(1)
    assert irq.wait_for(lambda: tx.take_used())  # completed: Linux spins until it is
    assert b"".join(output) == b"A ready\n"


def test_port_pending_bytes_survive_save_and_restore(port_rig):
    port, *_ = port_rig
    with transport_locked(port_rig[1]):
        port.feed(b"not yet taken")  # no receive buffer posted: the bytes wait
        saved = port.save_state()
    fresh = ConsolePort(lambda data: None)
    fresh.restore_state(saved)
    assert fresh.save_state() == saved and base64.b64decode(saved["pending"]) == b"not yet taken"
    fresh.close()


def test_agent_exec_goes_over_the_port_it_announced_itself_on(port_rig):
    port, transport, driver, rx, tx, irq, memory, _ = port_rig
    channel = AgentChannel()
    uart_bytes: list[bytes] = []
    channel.link(UART, uart_bytes.append)
    port.on_output = channel.link(VIRTIO_CONSOLE, port.feed)
    tx.post([b"A ready\n"], [])
    driver.kick(1)
    assert channel.ready.wait(30) and channel.transport == VIRTIO_CONSOLE
    results = []
    host = threading.Thread(target=lambda: results.append(channel.exec("echo hi", timeout=30)))
    host.start()
    request = b""
    while not request.endswith(b"\n"):
        request += _receive(driver, rx, irq, memory, 4096)
    kind, request_id, script = request.split()
    assert (kind, base64.b64decode(script)) == (b"X", b"echo hi")
    reply = b"R " + request_id + b" 3 " + base64.b64encode(b"x" * 10000) + b" \n"
    for start in range(0, len(reply), 4096):  # a page per buffer, as Linux's hvc sends it
        tx.post([reply[start:start + 4096]], [])
        driver.kick(1)
    host.join(30)
    assert (results[0].exit_code, results[0].stdout, results[0].stderr) == (3, b"x" * 10000, b"")
    assert uart_bytes == []  # nothing went to the UART
