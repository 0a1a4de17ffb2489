"""The exec agent of a libvirt guest: its virtio-console port (guest hvc0), or COM2 (ttyS1).

A local domain has both as unix sockets of QEMU's (`<console>` with a virtio target, and
`<serial>` port 1). The guest agent (`vmctl.guest_contract.GUEST_AGENT`) takes hvc0 when the
cmdline word `vmctl.agent=hvc0` names a device that exists (a kernel with virtio-console),
else ttyS1. Its "A ready" went out at boot to no one (QEMU keeps nothing for a socket no one
is connected to), so the host asks: a no-op request on each port, and the port that answers
is the agent's. The answer is kept in the state folder (`AGENT_TRANSPORT`, with QEMU's pid:
a new QEMU process is asked again), so later execs and `vmctl status` go straight to it.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import VmctlError
from ...guest_contract import ExecResult
from ...proc import write_json_atomic
from ...vmm.agent import TRANSPORTS, AgentChannel

PROBE = b"X 0 " + base64.b64encode(b":") + b"\n"  # request id 0: a channel's own ids start at 1
PROBE_EVERY = 1.0  # s: asked again, for an agent that had not opened its port yet
PROBE_LIMIT = 60.0  # s at most: a guest with no agent (e.g. not vmctl's /init) fails as fast as this


class _Port:
    """A connection to one of the agent's ports; its bytes feed a channel of its own, and
    `answered` is set (with `heard`) once a line of the agent's came back."""

    def __init__(self, transport: str, path: str, heard: threading.Event) -> None:
        self.transport, self.path, self.heard = transport, path, heard
        self.answered = threading.Event()
        self.channel = AgentChannel()
        self.channel.ready.set()  # the agent announced itself long ago, to no one
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._receive = self.channel.link(transport, self.sock.sendall)
        self.channel.transport = transport  # requests go here ("A ready" would have said so)
        self._tail = b"\n"  # the last bytes seen, for a line start split between reads
        self._reader = threading.Thread(target=self._pump, name=f"agent-{transport}", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                # QEMU closed the socket (the guest ended), or close() below: no reply can come
                self.channel.close(f"its {self.transport} socket closed (has the guest ended?)")
                return
            if not self.answered.is_set():
                seen = self._tail + data
                self._tail = seen[-2:]
                if b"\nR " in seen or b"\nA " in seen:  # only the agent writes to its port
                    self.answered.set()
                    self.heard.set()
            self._receive(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(1)


@dataclass(frozen=True)
class GuestAgent:
    """The agent of one machine: its ports (transport, socket path), preferred first; the
    state folder's file that keeps which one answered; the QEMU process it holds for."""

    machine: str
    ports: tuple[tuple[str, str], ...]
    known_file: Path | None = None
    qemu_pid: int | None = None

    def exec(self, script: str, timeout: float) -> ExecResult:
        deadline = time.monotonic() + timeout
        known = self.known()
        port = self._port(known, timeout)
        try:
            result = port.channel.exec(script, max(deadline - time.monotonic(), 1.0))
        except VmctlError as error:
            raise VmctlError(f"{self.machine}: {error}") from None
        finally:
            port.close()
        if port.transport != known and self.known_file is not None:  # it answered: the agent is there
            write_json_atomic(self.known_file, {"transport": port.transport, "qemu_pid": self.qemu_pid})
        return result

    def known(self) -> str | None:
        """The transport the agent answered on before, in this QEMU process."""
        return known_transport(self.known_file, self.qemu_pid)

    def _port(self, known: str | None, timeout: float) -> _Port:
        """The connected port to ask: the known one, the only one, or the one that answers."""
        candidates = [p for p in self.ports if p[0] == known] or list(self.ports)
        heard = threading.Event()
        opened: list[_Port] = []
        failures: list[str] = []
        for transport, path in candidates:
            try:
                opened.append(_Port(transport, path, heard))
            except OSError as error:
                failures.append(f"{path}: {error.strerror}")
        if not opened:
            raise VmctlError(f"{self.machine}: cannot reach the guest agent at {'; '.join(failures)}")
        if len(opened) == 1:
            return opened[0]  # one port only (e.g. a machine from before the virtio one): no question
        try:
            winner = self._ask(opened, heard, min(timeout, PROBE_LIMIT))
        except BaseException:
            for port in opened:
                port.close()
            raise
        for port in opened:
            if port is not winner:
                port.close()
        return winner

    def _ask(self, opened: Sequence[_Port], heard: threading.Event, timeout: float) -> _Port:
        """The port whose agent answers a no-op request; sent again every PROBE_EVERY s (bytes
        on a port no one reads wait in QEMU or the socket, a few bytes a second)."""
        deadline = time.monotonic() + timeout
        while True:
            for port in opened:
                try:
                    port.sock.sendall(PROBE)
                except OSError:
                    pass  # QEMU closed it: the other port may still answer
            if heard.wait(min(PROBE_EVERY, max(deadline - time.monotonic(), 0))):
                return next(port for port in opened if port.answered.is_set())
            if time.monotonic() >= deadline:
                raise VmctlError(f"{self.machine}: the guest agent did not answer within {timeout:g} s on "
                                 f"{' or '.join(port.transport for port in opened)}")


def known_transport(known_file: Path | None, qemu_pid: int | None) -> str | None:
    """What `GuestAgent` wrote: the transport, if it was found in QEMU process `qemu_pid`."""
    if known_file is None:
        return None
    try:
        data = json.loads(known_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("qemu_pid") != qemu_pid or data.get("transport") not in TRANSPORTS:
        return None
    return str(data["transport"])
