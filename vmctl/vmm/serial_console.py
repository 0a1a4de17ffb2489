"""The guest console's host side: copy output to sinks, watch lines, feed keyboard input."""

from __future__ import annotations

import collections
import os
import select
import sys
import termios
import threading
import tty
from typing import Callable, Protocol

ESCAPE_PREFIX = 0x01  # Ctrl-A, then 'x' quits (as in QEMU)
LINE_LIMIT = 4096



class ConsoleSink(Protocol):
    """Where console output goes: a binary file, or anything written and flushed like one."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> None: ...

class ConsoleOutput:
    """Receives the guest's console bytes; writes them out and reports each complete line."""

    def __init__(self, sinks: list[ConsoleSink], on_line: Callable[[str], None] | None = None, tail_lines: int = 40):
        self.sinks = sinks
        self.on_line = on_line
        self._line = bytearray()
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        lines = []
        with self._lock:
            for sink in self.sinks:
                sink.write(data)
                if b"\n" in data:
                    sink.flush()
            for byte in data:
                if byte == 0x0A:
                    lines.append(self._line.decode(errors="replace").rstrip("\r"))
                    self._line.clear()
                elif len(self._line) < LINE_LIMIT:
                    self._line.append(byte)
        for line in lines:
            self.tail.append(line)
            if self.on_line:
                self.on_line(line)

    def flush(self) -> None:
        with self._lock:
            for sink in self.sinks:
                sink.flush()


class ConsoleInput:
    """Forwards the host terminal's keystrokes to the guest; Ctrl-A x asks the VM to stop."""

    def __init__(self, feed: Callable[[bytes], None], on_quit: Callable[[], None], stream=None) -> None:
        self.feed = feed
        self.on_quit = on_quit
        self.stream = stream or sys.stdin
        self._saved: list | None = None
        self._stop_read, self._stop_write = os.pipe()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        fd = self.stream.fileno()
        if os.isatty(fd):
            self._saved = termios.tcgetattr(fd)
            tty.setraw(fd)
        self._thread = threading.Thread(target=self._loop, name="console-input", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_write, b"x")
        if self._thread:
            self._thread.join(timeout=1)
        if self._saved is not None:
            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None
        os.close(self._stop_read)
        os.close(self._stop_write)

    def _loop(self) -> None:
        fd = self.stream.fileno()
        escape = False
        while True:
            ready, _, _ = select.select([fd, self._stop_read], [], [])
            if self._stop_read in ready:
                return
            data = os.read(fd, 1024)
            if not data:
                return
            out = bytearray()
            for byte in data:
                if escape:
                    escape = False
                    if byte in (ord("x"), ord("X")):
                        self.on_quit()
                        return
                    if byte != ESCAPE_PREFIX:
                        out.append(ESCAPE_PREFIX)
                elif byte == ESCAPE_PREFIX:
                    escape = True
                    continue
                out.append(byte)
            if out:
                self.feed(bytes(out))
