"""The exec channel to the guest agent, over a second UART (COM2: 0x2f8, IRQ 3).

It needs no network and no virtio: the reference image's /init starts a small shell agent on
/dev/ttyS1 (docs/images.md). One line per message, base64 so any bytes survive:

    host  -> guest   X <id> <base64 shell script>
    guest -> host    R <id> <exit code> <base64 stdout> <base64 stderr>
    guest -> host    A ready                (once, when the agent starts)
"""

from __future__ import annotations

import base64
import itertools
import threading
from dataclasses import dataclass

from ..errors import VmctlError

COM2_PORT = 0x2F8
COM2_IRQ = 3
MAX_LINE = 64 << 20  # a reply larger than this is cut off rather than held


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


class AgentChannel:
    """Host side: `exec()` sends a script and waits for its reply; `receive()` takes guest bytes."""

    def __init__(self) -> None:
        self.send = lambda data: None  # set to the UART's feed() by the machine
        self._ids = itertools.count(1)
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

    def exec(self, script: str, timeout: float) -> ExecResult:
        if not self.ready.wait(timeout):
            raise VmctlError(f"the guest agent did not start within {timeout:g} s (does the image run it on ttyS1?)")
        request_id = next(self._ids)
        self.send(f"X {request_id} {base64.b64encode(script.encode()).decode()}\n".encode())
        with self._arrived:
            if not self._arrived.wait_for(lambda: request_id in self._replies, timeout):
                raise VmctlError(f"the guest agent did not answer within {timeout:g} s")
            return self._replies.pop(request_id)
