"""One thread per virtio device: waits on the queues' notify eventfds (KVM_IOEVENTFD targets),
the device's host fds and a stop eventfd, and processes queues off the vCPU threads."""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Any, Callable

from .mmio import VirtioMmioTransport

log = logging.getLogger(__name__)


class DeviceWorker:
    def __init__(self, transport: VirtioMmioTransport, name: str) -> None:
        self.transport = transport
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll = select.epoll()
        self._handlers: dict[int, tuple[str, Any]] = {}
        self.watch_queues(True)
        transport.watch_queues = self.watch_queues
        for fd, callback in transport.device.extra_fds().items():
            self.watch_host_fd(fd, callback)
        transport.device.watch = self.watch_host_fd
        transport.device.unwatch = self.unwatch_host_fd
        self._watch(self._stop_fd, ("stop", None))
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _watch(self, fd: int, what: tuple[str, Any], events: int = select.EPOLLIN) -> None:
        self._epoll.register(fd, events)
        self._handlers[fd] = what

    def watch_queues(self, enabled: bool) -> None:
        """Wait on the queues' notify fds, or stop (the kernel serves the queues: vhost)."""
        for index, fd in enumerate(self.transport.notify_fds):
            if enabled:
                if fd not in self._handlers:
                    self._watch(fd, ("queue", index))
            else:
                self.unwatch_host_fd(fd)

    def watch_host_fd(self, fd: int, callback: Callable[[], None]) -> None:
        # Edge-triggered: a device that stops reading (no guest buffers) is not woken
        # again and again; it resumes when the guest posts buffers and kicks.
        self._watch(fd, ("host", callback), select.EPOLLIN | select.EPOLLET)

    def unwatch_host_fd(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        self._handlers.pop(fd, None)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Wake the thread, wait for it, release the epoll and stop fds. Idempotent."""
        if self._stop_fd < 0:
            return
        os.eventfd_write(self._stop_fd, 1)
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
        self._epoll.close()
        os.close(self._stop_fd)
        self._stop_fd = -1

    def _run(self) -> None:
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                handler = self._handlers.get(fd)  # the vCPU thread may unwatch queues meanwhile
                if handler is None:
                    continue  # unwatched by an earlier handler of this batch
                kind, arg = handler
                if kind == "stop":
                    return
                if kind == "queue":
                    _drain(fd)
                    self.transport.process_queue(arg)
                else:
                    self.transport.run_device_callback(arg)


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
