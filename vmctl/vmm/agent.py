"""The exec channel to the guest agent: a virtio-console port (guest /dev/hvc0), or a second
UART (COM2: 0x2f8, IRQ 3) as fallback.

Neither needs a network. The guest side is `vmctl.guest_contract.GUEST_AGENT`, a busybox
shell loop that every VM backend starts in the background of the guest's `vmctl.cmd` (so any
image with vmctl's /init has it, with no image change). It runs on the port the kernel
command line names (`vmctl.agent=hvcN`, added by the VMM with the agent's virtio-console
device) when that device node exists, else on ttyS1. The UART costs a VM exit per byte; the
virtio port moves a page per exit. One line per message, base64 so any bytes survive:

    host  -> guest   X <id> <base64 shell script>
    guest -> host    R <id> <exit code> <base64 stdout> <base64 stderr>
    guest -> host    A ready                (once, when the agent starts)

Each transport is a byte stream registered with `link(name, send)`; replies go out on the
one "A ready" came from.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

from ..errors import VmctlError
from ..guest_contract import ExecResult

COM2_PORT = 0x2F8
COM2_IRQ = 3
MAX_LINE = 64 << 20  # a reply larger than this is cut off rather than held
log = logging.getLogger(__name__)

UART = "uart"
VIRTIO_CONSOLE = "virtio-console"
TRANSPORTS = (UART, VIRTIO_CONSOLE)
AGENT_CONSOLE_ENV = "VMCTL_AGENT_CONSOLE"  # "0": the agent stays on the UART (e.g. a kernel without virtio-console)


def console_wanted() -> bool:
    """Whether a new machine gets the agent's virtio-console port (native VMM and libvirt alike)."""
    return os.environ.get(AGENT_CONSOLE_ENV, "1") != "0"


@dataclass
class AgentState:
    ready: bool
    next_id: int
    transport: str = UART  # snapshots made before the virtio port had no such field


class _Link:
    """One byte stream from the guest: cuts it into lines for the channel."""

    def __init__(self, channel: "AgentChannel", name: str, send: Callable[[bytes], None]) -> None:
        self.channel, self.name, self.send = channel, name, send
        self.line = bytearray()

    def receive(self, data: bytes) -> None:
        # Whole slices, not a loop per byte: an exec reply is megabytes.
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._append(data[start:end])
            self.channel._handle(bytes(self.line).rstrip(b"\r"), self.name)
            self.line.clear()
            start = end + 1
        self._append(data[start:])

    def _append(self, piece: bytes) -> None:
        room = MAX_LINE - len(self.line)
        if room > 0:
            self.line += piece[:room]


class AgentChannel:
    """Host side: `exec()` sends a script and waits for its reply; each transport's receive
    function (from `link`) takes guest bytes."""

    def __init__(self) -> None:
        self._links: dict[str, _Link] = {}
        self.transport = UART  # where requests go: the link "A ready" came from
        self._next_id = 1
        self._lock = threading.Lock()
        self._replies: dict[int, ExecResult] = {}
        self._arrived = threading.Condition(self._lock)
        self.ready = threading.Event()
        self._closed: str | None = None  # why no reply can come any more (see close)

    def link(self, name: str, send: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """Register transport `name` (UART or VIRTIO_CONSOLE), whose `send` writes to the guest;
        returns the function its guest bytes go to."""
        if name not in TRANSPORTS:
            raise ValueError(f"agent transport {name!r}")
        self._links[name] = _Link(self, name, send)
        return self._links[name].receive

    def _handle(self, line: bytes, transport: str) -> None:
        parts = line.split(b" ")
        if parts[:2] == [b"A", b"ready"]:
            self.transport = transport
            self.ready.set()
            log.info("guest agent ready on %s", transport)
            return
        if len(parts) != 5 or parts[0] != b"R":
            return  # noise (e.g. a stray echo): ignore
        try:
            request_id, code = int(parts[1]), int(parts[2])
            result = ExecResult(code, base64.b64decode(parts[3]), base64.b64decode(parts[4]))
        except ValueError:
            return
        with self._arrived:
            self._replies[request_id] = result
            self._arrived.notify_all()

    def _take_id(self) -> int:
        with self._lock:
            request_id, self._next_id = self._next_id, self._next_id + 1
        return request_id

    def save_state(self) -> "AgentState":
        with self._lock:
            return AgentState(self.ready.is_set(), self._next_id, self.transport)

    def restore_state(self, state: "AgentState") -> None:
        """A restored guest's agent is already up, mid-loop, on the saved transport: no new
        'A ready' will come. Ids go on from the saved one, so a reply to a request made
        before the snapshot cannot be taken for the answer to a new one."""
        if state.transport not in self._links:
            raise VmctlError(f"agent.transport: the guest agent was saved on {state.transport!r}, "
                             f"this machine has {', '.join(self._links) or 'no transport'}")
        with self._lock:
            self._next_id = max(state.next_id, 1)
            self.transport = state.transport
        if state.ready:
            self.ready.set()

    def _send(self, request_id: int, script: str) -> None:
        link = self._links.get(self.transport)
        if link is None:
            raise VmctlError(f"the guest agent's transport {self.transport!r} is not connected")
        link.send(f"X {request_id} {base64.b64encode(script.encode()).decode()}\n".encode())

    def post(self, script: str) -> bool:
        """Send a script without waiting for its reply (e.g. a shutdown that never answers);
        False when the agent has not announced itself."""
        if not self.ready.is_set():
            return False
        self._send(self._take_id(), script)
        return True

    def close(self, reason: str) -> None:
        """No reply can come any more (e.g. the socket a libvirt guest's port is on ended with
        its QEMU): a waiting exec fails now instead of at its timeout."""
        with self._arrived:
            self._closed = reason
            self._arrived.notify_all()

    def exec(self, script: str, timeout: float) -> ExecResult:
        if not self.ready.wait(timeout):
            raise VmctlError(f"the guest agent did not start within {timeout:g} s "
                             "(does the image run it on hvc0 or ttyS1?)")
        request_id = self._take_id()
        self._send(request_id, script)
        with self._arrived:
            if not self._arrived.wait_for(lambda: request_id in self._replies or self._closed is not None, timeout):
                raise VmctlError(f"the guest agent did not answer within {timeout:g} s")
            if request_id not in self._replies:
                raise VmctlError(f"the guest agent did not answer: {self._closed}")
            return self._replies.pop(request_id)
