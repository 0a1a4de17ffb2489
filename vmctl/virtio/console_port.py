"""virtio-console (spec 5.3), single port, whose host end is in-process: guest output goes to
a callback, `feed()` queues bytes for the guest. The VMM puts its guest agent here (guest
/dev/hvcN): a page per VM exit where the agent's UART costs an exit per byte.

`feed()` may be called from any thread; the bytes wait in a buffer and go into the guest's
receive buffers at once on that thread (under the transport's lock, as the worker would), or,
if the driver is not up or has no buffers yet, when it posts some. Output pages are served on
the vCPU thread that kicks the transmit queue (`inline_queues`): Linux's hvc driver spins
until each page comes back, and in the nested host a hop to the worker thread and back
cost ~20 ms a page.
"""

from __future__ import annotations

import base64
import os
import threading
from typing import Any, Callable

from .console import TX, SinglePortConsole
from .device import DeviceError, QueueContext
from .queue import Virtqueue


class ConsolePort(SinglePortConsole):
    inline_queues = (TX,)  # Linux spins on each output page until it is used: no thread hop

    def __init__(self, on_output: Callable[[bytes], None], name: str = "console-port") -> None:
        self.name = name
        self.on_output = on_output
        self._pending = bytearray()
        self._pending_lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def extra_fds(self) -> dict[int, Callable[[], None]]:
        return {self._wake_fd: self._on_wake}

    def feed(self, data: bytes) -> None:
        """Bytes for the guest (any thread); they wait until the driver posts buffers."""
        with self._pending_lock:
            self._pending += data
        if self.run_now is not None:
            self.run_now(self._deliver)  # now, on this thread: no hop through the worker
        with self._pending_lock:
            left = bool(self._pending)
        if left:  # the driver is not up yet, or has no buffers: the worker tries again
            os.eventfd_write(self._wake_fd, 1)

    def process(self, index: int, queue: Virtqueue, ctx: QueueContext) -> None:
        if index == TX:
            for chain in queue.drain():
                data = chain.read_readable(ctx.memory)
                ctx.complete(queue, chain, 0)  # first: Linux spins until the buffer comes back
                self.on_output(data)
        else:
            self._rx = queue
            self._deliver()

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        self._deliver()

    def _deliver(self) -> None:
        """Move pending bytes into the guest's receive buffers while both have some."""
        queue, ctx = self._rx, self._ctx
        if queue is None or ctx is None:
            return
        while True:
            with self._pending_lock:
                if not self._pending:
                    return
            if queue.pending() == 0:
                queue.set_notification(True)
                if queue.pending() == 0:
                    return  # resumes when the guest posts buffers and kicks
            chain = queue.pop()
            if chain is None:
                return
            with self._pending_lock:
                with memoryview(self._pending) as view:  # released before the buffer shrinks
                    written = chain.write_writable(ctx.memory, view)
                del self._pending[:written]
            ctx.complete(queue, chain, written)

    # --- snapshots: bytes not yet delivered travel with the machine ---------------------------
    def save_state(self) -> dict[str, Any]:
        with self._pending_lock:
            return {"pending": base64.b64encode(bytes(self._pending)).decode("ascii")}

    def restore_state(self, state: dict[str, Any]) -> None:
        pending = state.get("pending", "")
        if not isinstance(pending, str):
            raise DeviceError("pending: expected base64 text")
        with self._pending_lock:
            self._pending[:] = base64.b64decode(pending)

    def close(self) -> None:
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1
