"""The VMM's control socket: one JSON request line in, one JSON response line out.

Requests: {"op": "status"}, {"op": "stop", "reason": "..."} and
{"op": "exec", "script": "...", "timeout": seconds} (through the guest agent). The server runs in a thread of
the VMM process; `request()` is the client every `vmctl` command uses.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Callable

from ..errors import VmctlError

log = logging.getLogger(__name__)
MAX_REQUEST = 64 * 1024


def listen_unix(path: Path, backlog: int) -> socket.socket:
    """A listening Unix socket at `path` (a stale one replaced), for the owner only."""
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError as error:
        sock.close()
        raise VmctlError(f"{path}: cannot listen: {error.strerror} (the state directory must be on a "
                         "local file system: set VMCTL_STATE_DIR)") from None
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock


def close_unix(sock: socket.socket, path: Path) -> None:
    """Stop listening (waking the accept loop) and remove the socket file."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Callable[[dict], dict]]) -> None:
        self.path = path
        self.handlers = handlers
        self.sock = listen_unix(path, backlog=8)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        close_unix(self.sock, self.path)

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return  # closed
            # One thread per request: a long `exec` must not hold up `status` or `stop`.
            threading.Thread(target=self._answer_and_close, args=(connection,), daemon=True).start()

    def _answer_and_close(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(5)
            try:
                self._answer(connection)
            except (OSError, ValueError):
                pass

    def _answer(self, connection: socket.socket) -> None:
        data = b""
        while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
            chunk = connection.recv(4096)
            if not chunk:
                break
            data += chunk
        try:
            message = json.loads(data)
            handler = self.handlers[message["op"]]
            response = {"ok": True, **handler(message)}
        except (ValueError, KeyError, TypeError) as error:
            response = {"ok": False, "error": f"bad request: {error}"}
        except VmctlError as error:
            response = {"ok": False, "error": str(error)}
        except Exception as error:  # a VMM bug: the client gets a line, the log the traceback
            log.exception("control request failed")
            response = {"ok": False, "error": f"VMM error: {error} (see vmm.log)"}
        connection.sendall(json.dumps(response).encode() + b"\n")


def request(path: Path, op: str, timeout: float = 5.0, **fields: object) -> dict:
    """Send one request; raises VmctlError when the VMM does not answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
            # Chunks joined once: an exec answer is megabytes, and `data += chunk` per 4 KiB
            # copied it over and over (seconds for 4 MiB of output in the nested host).
            chunks: list[bytes] = []
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                if chunk.endswith(b"\n"):  # one JSON line: its only newline ends it
                    break
            data = b"".join(chunks)
        except OSError as error:
            raise VmctlError(f"{path}: the VMM does not answer: {error.strerror or error}") from None
    try:
        response = json.loads(data)
    except ValueError:
        raise VmctlError(f"{path}: unreadable answer from the VMM: {data[:200]!r}") from None
    if not response.get("ok"):
        raise VmctlError(f"{path}: {response.get('error', 'request failed')}")
    return response
