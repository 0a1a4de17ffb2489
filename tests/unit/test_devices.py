"""Legacy devices and buses driven the way a guest driver drives them."""

from __future__ import annotations

import pytest

from vmctl.devices import serial as uart
from vmctl.devices.bus import Bus
from vmctl.devices.simple import I8042, ExitPort


class Recorder:
    def __init__(self) -> None:
        self.output = bytearray()
        self.interrupts = 0

    def write(self, data: bytes) -> None:
        self.output += data

    def irq(self) -> None:
        self.interrupts += 1


@pytest.fixture
def com1():
    recorder = Recorder()
    return uart.Serial(recorder.write, recorder.irq), recorder


def reg(device, offset: int) -> int:
    return device.read(offset, 1)[0]


def test_transmit_goes_out_and_line_status_says_empty(com1):
    device, recorder = com1
    for byte in b"ok\n":
        device.write(uart.DATA, bytes([byte]))
    assert recorder.output == b"ok\n"
    assert reg(device, uart.LSR) & (uart.LSR_THR_EMPTY | uart.LSR_IDLE) == 0x60


def test_scratch_and_divisor_latch(com1):
    device, _ = com1
    device.write(uart.SCR, b"\xa5")
    assert reg(device, uart.SCR) == 0xA5
    device.write(uart.LCR, bytes([uart.LCR_DLAB | 3]))
    device.write(uart.DATA, b"\x01")
    device.write(uart.IER, b"\x00")
    assert (reg(device, uart.DATA), reg(device, uart.IER)) == (1, 0)
    device.write(uart.LCR, b"\x03")
    assert device.divisor == 1


def test_loopback_mode_as_the_8250_probe_checks_it(com1):
    device, recorder = com1
    device.write(uart.MCR, bytes([uart.MCR_LOOP | 0x0A]))  # loop + RTS + OUT2
    assert reg(device, uart.MSR) & 0xF0 == 0x90  # CTS + DCD
    device.write(uart.DATA, b"Z")
    assert recorder.output == b""  # looped back, not transmitted
    assert reg(device, uart.LSR) & uart.LSR_DATA_READY
    assert reg(device, uart.DATA) == ord("Z")


def test_receive_interrupt_and_identification(com1):
    device, recorder = com1
    device.write(uart.IER, bytes([uart.IER_RX_AVAILABLE]))
    device.feed(b"hi")
    assert recorder.interrupts == 1
    assert reg(device, uart.IIR_FCR) & 0x0F == uart.IIR_RX_AVAILABLE
    assert bytes([reg(device, uart.DATA), reg(device, uart.DATA)]) == b"hi"
    assert reg(device, uart.IIR_FCR) & 0x0F == uart.IIR_NONE


def test_thr_empty_interrupt_is_acknowledged_by_reading_iir(com1):
    device, recorder = com1
    device.write(uart.IER, bytes([uart.IER_THR_EMPTY]))
    assert recorder.interrupts == 1
    assert reg(device, uart.IIR_FCR) & 0x0F == uart.IIR_THR_EMPTY
    assert reg(device, uart.IIR_FCR) & 0x0F == uart.IIR_NONE
    device.write(uart.DATA, b"x")
    assert recorder.interrupts == 2


def test_input_beyond_the_fifo_limit_is_dropped(com1):
    device, _ = com1
    device.feed(b"a" * (uart.RX_FIFO_LIMIT + 100))
    assert len(device._rx) == uart.RX_FIFO_LIMIT


def test_bus_dispatch_offsets_and_overlap():
    bus = Bus("pio")
    seen = []
    bus.register(0x60, 5, I8042(lambda: seen.append("reset")))
    bus.register(0xF4, 4, ExitPort(seen.append))
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(0x62, 4, ExitPort(seen.append))
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(0xF0, 8, ExitPort(seen.append))
    bus.write(0x64, b"\x00")
    bus.write(0x64, b"\xfe")
    bus.write(0xF5, b"\x09")
    assert seen == ["reset", 9]
    assert bus.read(0x1000, 2) == b"\xff\xff"
    bus.read(0x1000, 1)
    assert bus.unhandled == {("read", 0x1000): 2}
