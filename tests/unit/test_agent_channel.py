"""The exec channel over COM2, with a guest side that drives the UART registers like a driver."""

from __future__ import annotations

import base64
import subprocess
import threading
import time

import pytest

from vmctl.devices import serial as uart
from vmctl.errors import VmctlError
from vmctl.vmm.agent import UART, VIRTIO_CONSOLE, AgentChannel, AgentState


class ShellAgentGuest(threading.Thread):
    """Reads request lines from the UART, runs them with the host's /bin/sh (as the guest's
    busybox agent does), writes replies back byte by byte through THR."""

    def __init__(self, device: uart.Serial) -> None:
        super().__init__(daemon=True)
        self.device = device
        self.stop = threading.Event()

    def put(self, data: bytes) -> None:
        for byte in data:
            self.device.write(uart.DATA, bytes([byte]))

    def run(self) -> None:
        self.put(b"A ready\n")
        line = bytearray()
        while not self.stop.is_set():
            if not self.device.read(uart.LSR, 1)[0] & uart.LSR_DATA_READY:
                time.sleep(0.001)
                continue
            byte = self.device.read(uart.DATA, 1)[0]
            if byte != 0x0A:
                line.append(byte)
                continue
            kind, request_id, payload = bytes(line).split(b" ")
            line.clear()
            done = subprocess.run(["/bin/sh", "-c", base64.b64decode(payload)], capture_output=True)
            reply = b" ".join([b"R", request_id, str(done.returncode).encode(),
                               base64.b64encode(done.stdout), base64.b64encode(done.stderr)])
            self.put(b"noise before the reply\n" + reply + b"\n")


@pytest.fixture
def channel():
    agent = AgentChannel()
    device = uart.Serial(lambda data: None, lambda: None)
    device.output = agent.link(UART, device.feed)
    guest = ShellAgentGuest(device)
    guest.start()
    yield agent
    guest.stop.set()
    guest.join()


def test_exec_round_trip_with_binary_output_and_status(channel):
    result = channel.exec("printf 'a b\\n'; printf '\\001\\377' >&2; exit 7", timeout=10)
    assert (result.exit_code, result.stdout, result.stderr) == (7, b"a b\n", b"\x01\xff")


def test_concurrent_requests_get_their_own_replies(channel):
    results = {}

    def one(n: int) -> None:
        results[n] = channel.exec(f"echo {n}", timeout=20).stdout

    threads = [threading.Thread(target=one, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {n: f"{n}\n".encode() for n in range(5)}


def test_no_agent_is_a_clear_error():
    with pytest.raises(VmctlError, match="the guest agent did not start within 0.1 s"):
        AgentChannel().exec("true", timeout=0.1)


def test_requests_follow_the_transport_the_agent_announced_itself_on():
    channel = AgentChannel()
    sent: dict[str, list[bytes]] = {UART: [], VIRTIO_CONSOLE: []}
    receive = {name: channel.link(name, sent[name].append) for name in (UART, VIRTIO_CONSOLE)}
    receive[VIRTIO_CONSOLE](b"A re")
    receive[VIRTIO_CONSOLE](b"ady\r\nnoise\n")
    assert channel.ready.is_set() and channel.transport == VIRTIO_CONSOLE
    assert channel.post("true")
    assert sent == {UART: [], VIRTIO_CONSOLE: [b"X 1 " + base64.b64encode(b"true") + b"\n"]}
    assert channel.save_state() == AgentState(True, 2, VIRTIO_CONSOLE)


def test_a_saved_transport_this_machine_lacks_is_a_clear_error():
    channel = AgentChannel()
    channel.link(UART, lambda data: None)
    with pytest.raises(VmctlError, match="agent.transport: the guest agent was saved on 'virtio-console', this machine has uart"):
        channel.restore_state(AgentState(True, 5, VIRTIO_CONSOLE))
