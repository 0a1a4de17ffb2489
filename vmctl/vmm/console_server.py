"""The serial console of a detached VMM, shared over a Unix socket (`vmctl console NAME`).

Every connected client receives the console output from the moment it attaches; bytes a
client sends are typed into the guest's COM1. A client that cannot keep up is dropped
rather than allowed to stall the guest's UART.
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path
from typing import Callable

from .control import close_unix, listen_unix


class ConsoleServer:
    """A console sink (write/flush, like a file) and a listener for attaching clients."""

    def __init__(self, path: Path, feed: Callable[[bytes], None]) -> None:
        self.path = path
        self.feed = feed  # set once the machine's UART exists
        self._clients: list[socket.socket] = []
        self._lock = threading.Lock()
        self.sock = listen_unix(path, backlog=4)
        threading.Thread(target=self._accept_loop, name="console-server", daemon=True).start()

    # --- sink side (called by the machine's console output) --------------------------------
    def write(self, data: bytes) -> int:
        with self._lock:
            for client in list(self._clients):
                try:
                    client.sendall(data)
                except OSError:  # gone, or too slow (send timeout)
                    self._drop(client)
        return len(data)

    def flush(self) -> None:
        pass

    # --- clients -------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            # A kernel-level send timeout: a stuck client fails its send instead of blocking
            # the guest's UART (a Python-level timeout would make the reader non-blocking too).
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 2, 0))
            with self._lock:
                self._clients.append(client)
            threading.Thread(target=self._read_loop, args=(client,), daemon=True).start()

    def _read_loop(self, client: socket.socket) -> None:
        while True:
            try:
                data = client.recv(4096)
            except OSError:
                break
            if not data:
                break
            self.feed(data)
        with self._lock:
            self._drop(client)

    def _drop(self, client: socket.socket) -> None:
        if client in self._clients:
            self._clients.remove(client)
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()

    def close(self) -> None:
        with self._lock:
            for client in list(self._clients):
                self._drop(client)
        close_unix(self.sock, self.path)
