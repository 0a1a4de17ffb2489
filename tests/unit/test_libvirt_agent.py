"""The libvirt guest agent's port choice (vmctl.backends.libvirt.agent_ports): the port that answers
is used and remembered per QEMU process. The guest side is a peer on QEMU's place: a unix
socket server speaking the agent's protocol on one port, silent on the other (as a port
no one reads in the guest is). The real guests are in tests/linux/inner/test_libvirt.py."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmctl.backends.libvirt.agent_ports import PROBE, GuestAgent, known_transport
from vmctl.errors import VmctlError
from vmctl.vmm.agent import UART, VIRTIO_CONSOLE


class Port:
    """A QEMU-side socket of one port; `agent`: a guest agent reads this port; `hang_up`: it
    closes the connection at the first script after the probe (the guest powered off)."""

    def __init__(self, path: Path, agent: bool, hang_up: bool = False) -> None:
        self.path, self.agent, self.hang_up = path, agent, hang_up
        self.connections = 0
        self.requests: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._talk, args=(connection,), daemon=True).start()

    def _talk(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rb") as lines:
            for line in lines:
                self.requests.append(line)
                if not self.agent:
                    continue  # bytes on a port no one reads: no answer
                _, request_id, script = line.split()
                if self.hang_up and request_id != b"0":
                    return
                out = base64.b64encode(b"ran " + base64.b64decode(script)).decode()
                connection.sendall(f"R {request_id.decode()} 0 {out} \n".encode())


@pytest.fixture
def ports(tmp_path) -> Iterator[callable]:
    made: list[Port] = []

    def make(agent_on: str) -> tuple[GuestAgent, dict[str, Port]]:
        served = {t: Port(tmp_path / f"{t}.sock", agent=t == agent_on) for t in (VIRTIO_CONSOLE, UART)}
        made.extend(served.values())
        agent = GuestAgent("m", tuple((t, str(p.path)) for t, p in served.items()), tmp_path / "agent-transport.json", 4242)
        return agent, served

    yield make
    for port in made:
        port.server.close()


@pytest.mark.parametrize("agent_on", [VIRTIO_CONSOLE, UART])
def test_exec_goes_to_the_port_that_answers_and_remembers_it(ports, agent_on):
    agent, served = ports(agent_on)
    assert agent.exec("echo hi", 10).stdout == b"ran echo hi"
    assert agent.known() == agent_on
    assert json.loads(agent.known_file.read_text()) == {"transport": agent_on, "qemu_pid": 4242}
    other = served[UART if agent_on == VIRTIO_CONSOLE else VIRTIO_CONSOLE]
    asked = other.connections
    assert agent.exec("true", 10).stdout == b"ran true"
    assert other.connections == asked  # known: straight to its port, no question on the other
    assert served[agent_on].requests[0] == PROBE  # asked with a no-op first, then the scripts


def test_a_new_qemu_process_is_asked_again(ports):
    agent, served = ports(UART)
    agent.known_file.write_text(json.dumps({"transport": VIRTIO_CONSOLE, "qemu_pid": 1}))
    assert agent.known() is None  # written for another QEMU process
    assert agent.exec("x", 10).stdout == b"ran x" and agent.known() == UART
    assert served[VIRTIO_CONSOLE].connections == 1


def test_no_answer_is_one_line_naming_both_ports(ports, monkeypatch):
    monkeypatch.setattr("vmctl.backends.libvirt.agent_ports.PROBE_EVERY", 0.1)
    agent, served = ports("none")
    with pytest.raises(VmctlError, match=r"^m: the guest agent did not answer within 0.5 s on virtio-console or uart$"):
        agent.exec("true", 0.5)
    assert len(served[UART].requests) >= 2  # asked again while it waited
    assert agent.known() is None


def test_an_unreachable_port_leaves_the_other(tmp_path, ports):
    agent, served = ports(UART)
    served[VIRTIO_CONSOLE].server.close()
    served[VIRTIO_CONSOLE].path.unlink()
    assert agent.exec("y", 10).stdout == b"ran y" and agent.known() == UART
    lost = GuestAgent("m", ((UART, str(tmp_path / "gone.sock")),))
    with pytest.raises(VmctlError, match=r"^m: cannot reach the guest agent at .*gone.sock: No such file or directory$"):
        lost.exec("true", 1)


def test_known_transport_reads_only_what_it_wrote(tmp_path):
    path = tmp_path / "agent-transport.json"
    assert known_transport(None, 1) is None and known_transport(path, 1) is None
    for text in ("{", "[]", '{"transport": "carrier-pigeon", "qemu_pid": 1}'):
        path.write_text(text)
        assert known_transport(path, 1) is None
    path.write_text('{"transport": "uart", "qemu_pid": null}')
    assert known_transport(path, None) == "uart"


def test_a_guest_that_ends_before_it_answers_fails_at_once(ports):
    agent, served = ports(UART)
    served[UART].hang_up = True
    with pytest.raises(VmctlError, match=r"^m: the guest agent did not answer: its uart socket closed \(has the guest ended\?\)$"):
        agent.exec("touch /tmp/go", 60)  # the close, not the 60 s: "did not answer within" otherwise
