"""virtio-console (spec 5.3), single port: the guest's /dev/hvc0 as a host↔guest byte channel.

The host end is a Unix stream socket that vmctl listens on; one client at a time is
connected to hvc0 (a newer client replaces the old one). Guest output with no client
connected is dropped, like a serial line with nobody listening. This gives a command channel
(e.g. a guest agent on hvc0) that needs no guest networking.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from typing import Callable

from ..errors import VmctlError
from .device import ID_CONSOLE, QueueContext, VirtioDevice
from .queue import Virtqueue

log = logging.getLogger(__name__)

RX, TX = 0, 1  # receiveq (host → guest), transmitq (guest → host) of port 0
QUEUE_SIZE = 64
READ_CHUNK = 64 * 1024


class SinglePortConsole(VirtioDevice):
    """What every single-port virtio-console shares: its id, queues and config, and the queue
    context and receive queue it keeps once the driver is up."""

    device_id = ID_CONSOLE
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    _ctx: QueueContext | None = None
    _rx: Virtqueue | None = None

    def config_bytes(self) -> bytes:
        return struct.pack("<HHII", 80, 25, 1, 0)  # cols, rows, max_nr_ports, emerg_wr

    def activate(self, features: int, ctx: QueueContext) -> None:
        self._ctx = ctx

    def reset(self) -> None:
        self._ctx = None
        self._rx = None


class ConsoleDevice(SinglePortConsole):
    name = "console"

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        if os.path.exists(socket_path):
            os.unlink(socket_path)  # a stale socket from an earlier run
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            self.listener.bind(socket_path)
            self.listener.listen(1)
        except OSError as error:
            self.listener.close()
            raise VmctlError(f"--console-channel {socket_path}: cannot listen: {error.strerror}") from None
        self.client: socket.socket | None = None

    def extra_fds(self) -> dict[int, Callable[[], None]]:
        return {self.listener.fileno(): self._accept}

    def process(self, index: int, queue: Virtqueue, ctx: QueueContext) -> None:
        if index == TX:
            for chain in queue.drain():
                data = chain.read_readable(ctx.memory)
                self._send(data)
                ctx.complete(queue, chain, 0)
        else:
            self._rx = queue
            self._receive()

    def _send(self, data: bytes) -> None:
        if self.client is None:
            return
        try:
            self.client.sendall(data)
        except BlockingIOError:
            log.info("virtio-console: client is not reading; output dropped")
        except OSError:
            self._drop_client()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except BlockingIOError:
                return
            self._drop_client()
            connection.setblocking(False)
            self.client = connection
            if self.watch:
                self.watch(connection.fileno(), self._receive)
            self._receive()

    def _receive(self) -> None:
        """Move client bytes into the guest's receive buffers while both have some."""
        queue, ctx = self._rx, self._ctx
        if queue is None or ctx is None or self.client is None:
            return
        while True:
            if queue.pending() == 0:
                queue.set_notification(True)
                if queue.pending() == 0:
                    return  # resumes when the guest posts buffers and kicks
            # Peek first: bytes are taken from the socket only once a buffer is in hand.
            try:
                if not self.client.recv(1, socket.MSG_PEEK):
                    self._drop_client()
                    return
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno != errno.EAGAIN:
                    self._drop_client()
                return
            chain = queue.pop()
            if chain is None:
                return
            views = chain.writable_views(ctx.memory)
            got = self.client.recvmsg_into(views)[0] if views else 0
            ctx.complete(queue, chain, got)

    def _drop_client(self) -> None:
        if self.client is not None:
            if self.unwatch:
                self.unwatch(self.client.fileno())
            self.client.close()
            self.client = None

    def close(self) -> None:
        self._drop_client()
        self.listener.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
