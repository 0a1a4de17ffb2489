"""A 16550A UART: the guest's console on COM1 (0x3f8, IRQ 4).

Transmission is instant (THR is always empty), so the guest never waits on us; received
bytes queue in a FIFO. Loopback mode and the scratch register are emulated because Linux's
8250 driver probes them before it trusts the port.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Callable

COM1_PORT = 0x3F8
COM1_IRQ = 4

# Register offsets
DATA, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RX_AVAILABLE = 0x01
IER_THR_EMPTY = 0x02
IIR_NONE = 0x01
IIR_THR_EMPTY = 0x02
IIR_RX_AVAILABLE = 0x04
IIR_FIFO_ENABLED = 0xC0
FCR_FIFO_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x20
LSR_IDLE = 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
RX_FIFO_LIMIT = 64 * 1024  # input beyond this is dropped rather than held without bound


@dataclass
class SerialState:
    """The registers a driver programmed and the bytes it has not read yet (snapshots)."""

    ier: int
    lcr: int
    mcr: int
    scr: int
    fcr: int
    divisor: int
    thr_empty_pending: bool
    rx: bytes


class Serial:
    def __init__(self, output: Callable[[bytes], None], interrupt: Callable[[], None]) -> None:
        self.output = output
        self.interrupt = interrupt
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self.ier = 0
        self.lcr = 0x03  # 8n1
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.divisor = 12  # 9600 baud
        self._thr_empty_pending = True

    # --- host side -------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes typed by the host user arrive at the guest."""
        with self._lock:
            room = RX_FIFO_LIMIT - len(self._rx)
            self._rx.extend(data[:room])
            raise_irq = bool(self.ier & IER_RX_AVAILABLE) and bool(self._rx)
        if raise_irq:
            self.interrupt()

    # --- snapshots -------------------------------------------------------------------------
    def save_state(self) -> SerialState:
        with self._lock:
            return SerialState(self.ier, self.lcr, self.mcr, self.scr, self.fcr, self.divisor,
                               self._thr_empty_pending, bytes(self._rx))

    def restore_state(self, state: SerialState) -> None:
        with self._lock:
            self.ier, self.lcr, self.mcr, self.scr = state.ier & 0x0F, state.lcr & 0xFF, state.mcr & 0x1F, state.scr & 0xFF
            self.fcr, self.divisor = state.fcr & 0xFF, state.divisor & 0xFFFF
            self._thr_empty_pending = state.thr_empty_pending
            self._rx = collections.deque(state.rx[:RX_FIFO_LIMIT])

    # --- guest side ------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read_register(offset)
        return bytes([value]) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        raise_irq = False
        emitted = None
        with self._lock:
            value = data[0]
            if offset == DATA and not self.lcr & LCR_DLAB:
                if self.mcr & MCR_LOOP:
                    self._rx.append(value)
                    raise_irq = bool(self.ier & IER_RX_AVAILABLE)
                else:
                    emitted = bytes([value])
                self._thr_empty_pending = True
                raise_irq = raise_irq or bool(self.ier & IER_THR_EMPTY)
            elif offset == DATA:
                self.divisor = (self.divisor & 0xFF00) | value
            elif offset == IER and not self.lcr & LCR_DLAB:
                newly_enabled = value & ~self.ier
                self.ier = value & 0x0F
                if newly_enabled & IER_THR_EMPTY:
                    self._thr_empty_pending = True
                    raise_irq = True
                if newly_enabled & IER_RX_AVAILABLE and self._rx:
                    raise_irq = True
            elif offset == IER:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            elif offset == IIR_FCR:
                self.fcr = value
                if value & FCR_CLEAR_RX:
                    self._rx.clear()
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                self.mcr = value & 0x1F
            elif offset == SCR:
                self.scr = value
        if emitted is not None:
            self.output(emitted)
        if raise_irq:
            self.interrupt()

    def _read_register(self, offset: int) -> int:
        if offset == DATA and self.lcr & LCR_DLAB:
            return self.divisor & 0xFF
        if offset == IER and self.lcr & LCR_DLAB:
            return self.divisor >> 8
        if offset == DATA:
            return self._rx.popleft() if self._rx else 0
        if offset == IER:
            return self.ier
        if offset == IIR_FCR:
            return self._identify_interrupt() | (IIR_FIFO_ENABLED if self.fcr & FCR_FIFO_ENABLE else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THR_EMPTY | LSR_IDLE | (LSR_DATA_READY if self._rx else 0)
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                # Loopback wires the modem outputs back to the inputs (the 8250 probe checks this).
                return (
                    (MSR_CTS if self.mcr & MCR_RTS else 0)
                    | (MSR_DSR if self.mcr & MCR_DTR else 0)
                    | (MSR_RI if self.mcr & MCR_OUT1 else 0)
                    | (MSR_DCD if self.mcr & MCR_OUT2 else 0)
                )
            return MSR_DCD | MSR_DSR | MSR_CTS
        return self.scr

    def _identify_interrupt(self) -> int:
        if self.ier & IER_RX_AVAILABLE and self._rx:
            return IIR_RX_AVAILABLE
        if self.ier & IER_THR_EMPTY and self._thr_empty_pending:
            self._thr_empty_pending = False  # reading IIR acknowledges THR-empty
            return IIR_THR_EMPTY
        return IIR_NONE
