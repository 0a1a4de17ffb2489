"""Small legacy devices: the i8042 reset line, the test exit port and an I/O-delay sink."""

from __future__ import annotations

from typing import Callable

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
I8042_CMD_RESET = 0xFE
EXIT_PORT = 0xF4
IO_DELAY_PORT = 0x80


class I8042:
    """Just enough of the keyboard controller for `reboot=k`: 0xFE on port 0x64 resets the VM.

    Status reads return 0 (no data, input buffer empty), so drivers waiting on it move on.
    """

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        if offset == I8042_COMMAND_PORT - I8042_DATA_PORT and data[0] == I8042_CMD_RESET:
            self.on_reset()


class ExitPort:
    """A guest writes its exit status (low byte of a 1-4 byte OUT) to end the VM with it."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        self.on_exit(data[0])


class Sink:
    """Ignores writes and reads as zero: port 0x80, which Linux writes to for I/O delays."""

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        pass
