"""The exec channel to the guest agent, over a second UART (COM2: 0x2f8, IRQ 3).

It needs no network and no virtio. The guest side is `vmctl.guest_contract.GUEST_AGENT`, a
busybox shell loop that every VM backend starts in the background of the guest's `vmctl.cmd` (so any image with
vmctl's /init has it, with no image change). One line per message, base64 so any bytes survive:

    host  -> guest   X <id> <base64 shell script>
    guest -> host    R <id> <exit code> <base64 stdout> <base64 stderr>
    guest -> host    A ready                (once, when the agent starts)
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass

from ..errors import VmctlError
from ..guest_contract import ExecResult

COM2_PORT = 0x2F8
COM2_IRQ = 3
MAX_LINE = 64 << 20  # a reply larger than this is cut off rather than held


@dataclass
class AgentState:
    ready: bool
    next_id: int


class AgentChannel:
    """Host side: `exec()` sends a script and waits for its reply; `receive()` takes guest bytes."""

    def __init__(self) -> None:
        self.send = lambda data: None  # set to the UART's feed() by the machine
        self._next_id = 1
        self._line = bytearray()
        self._lock = threading.Lock()
        self._replies: dict[int, ExecResult] = {}
        self._arrived = threading.Condition(self._lock)
        self.ready = threading.Event()

    def receive(self, data: bytes) -> None:
        for byte in data:
            if byte == 0x0A:
                self._handle(bytes(self._line).rstrip(b"\r"))
                self._line.clear()
            elif len(self._line) < MAX_LINE:
                self._line.append(byte)

    def _handle(self, line: bytes) -> None:
        parts = line.split(b" ")
        if parts[:2] == [b"A", b"ready"]:
            self.ready.set()
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
            return AgentState(self.ready.is_set(), self._next_id)

    def restore_state(self, state: "AgentState") -> None:
        """A restored guest's agent is already up, mid-loop: no new 'A ready' will come. Ids
        go on from the saved one, so a reply to a request made before the snapshot cannot be
        taken for the answer to a new one."""
        with self._lock:
            self._next_id = max(state.next_id, 1)
        if state.ready:
            self.ready.set()

    def post(self, script: str) -> bool:
        """Send a script without waiting for its reply (e.g. a shutdown that never answers);
        False when the agent has not announced itself."""
        if not self.ready.is_set():
            return False
        self.send(f"X {self._take_id()} {base64.b64encode(script.encode()).decode()}\n".encode())
        return True

    def exec(self, script: str, timeout: float) -> ExecResult:
        if not self.ready.wait(timeout):
            raise VmctlError(f"the guest agent did not start within {timeout:g} s (does the image run it on ttyS1?)")
        request_id = self._take_id()
        self.send(f"X {request_id} {base64.b64encode(script.encode()).decode()}\n".encode())
        with self._arrived:
            if not self._arrived.wait_for(lambda: request_id in self._replies, timeout):
                raise VmctlError(f"the guest agent did not answer within {timeout:g} s")
            return self._replies.pop(request_id)
