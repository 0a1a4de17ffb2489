"""One thread per vCPU: KVM_RUN in a loop, port I/O and MMIO exits dispatched to the buses."""

from __future__ import annotations

import ctypes
import errno
import logging
import signal
import threading
from typing import Callable

from ..devices.bus import Bus
from ..kvm import abi
from ..kvm.vcpu import VcpuFd
from .outcome import Outcome

log = logging.getLogger(__name__)

# Sent to a vCPU thread to pull it out of KVM_RUN (with immediate_exit set first).
KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> None:
    """The kick signal must not kill the process; a no-op handler makes KVM_RUN return EINTR."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda *_: None)


class VcpuThread(threading.Thread):
    def __init__(self, vcpu: VcpuFd, pio: Bus, mmio: Bus, stop: Callable[[Outcome], None], stopping: threading.Event):
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.stop = stop
        self.stopping = stopping
        self.exits = 0
        # Pausing (for a snapshot): the thread parks outside KVM_RUN until resumed.
        self._pause_requested = threading.Event()
        self._parked = threading.Event()
        self._resume = threading.Event()

    def kick(self) -> None:
        self.vcpu.run_state.immediate_exit = 1
        if self.ident is not None and self.is_alive():
            try:
                signal.pthread_kill(self.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def request_pause(self) -> None:
        """Ask the thread to park; `wait_parked` tells when it has. The kick's immediate_exit
        makes the next KVM_RUN finish the pending port/MMIO read (if any) and return at once,
        so the registers are final when the thread parks."""
        self._resume.clear()
        self._pause_requested.set()
        self.kick()

    def wait_parked(self, timeout: float) -> bool:
        return self._parked.wait(timeout) or not self.is_alive()

    def resume(self) -> None:
        self._pause_requested.clear()
        self._resume.set()

    def _park(self) -> None:
        self._parked.set()
        while not self._resume.wait(0.5):
            if self.stopping.is_set():
                break
        self._parked.clear()
        if not self.stopping.is_set():
            # Cleared first, then re-armed if another pause came meanwhile (its kick may
            # have landed before the clear).
            self.vcpu.run_state.immediate_exit = 0
            if self._pause_requested.is_set() or self.stopping.is_set():
                self.vcpu.run_state.immediate_exit = 1

    def run(self) -> None:
        try:
            self._loop()
        except Exception as error:  # a VMM bug must end the VM, not leave a vCPU silently dead
            log.exception("vCPU %d failed", self.vcpu.index)
            self.stop(Outcome.crash(f"vCPU {self.vcpu.index}: VMM error: {error}"))

    def _loop(self) -> None:
        run = self.vcpu.run_state
        while not self.stopping.is_set():
            try:
                reason = self.vcpu.run()
            except OSError as error:
                if error.errno in (errno.EINTR, errno.EAGAIN):
                    # Only here, after a KVM_RUN that returned EINTR, is a parked vCPU's
                    # state complete (not right after an I/O exit: see request_pause).
                    if self._pause_requested.is_set() and not self.stopping.is_set():
                        self._park()
                    continue
                raise
            self.exits += 1
            if reason == abi.KVM_EXIT_IO:
                self._port_io(run.exit.io)
            elif reason == abi.KVM_EXIT_MMIO:
                self._mmio(run.exit.mmio)
            elif reason == abi.KVM_EXIT_INTR:
                continue
            else:
                self._other_exit(reason)
                return

    def _port_io(self, io: abi.KvmRunExitIo) -> None:
        length = io.size * io.count
        data = self.vcpu.run_page(io.data_offset, length)
        if io.direction == abi.KVM_EXIT_IO_OUT:
            for i in range(io.count):
                self.pio.write(io.port, bytes(data[i * io.size : (i + 1) * io.size]))
        else:
            for i in range(io.count):
                data[i * io.size : (i + 1) * io.size] = self.pio.read(io.port, io.size)

    def _mmio(self, mmio: abi.KvmRunExitMmio) -> None:
        length = min(mmio.len, 8)
        if mmio.is_write:
            self.mmio.write(mmio.phys_addr, bytes(mmio.data[:length]))
        else:
            value = self.mmio.read(mmio.phys_addr, length)
            ctypes.memmove(mmio.data, value, length)

    def _other_exit(self, reason: int) -> None:
        run = self.vcpu.run_state
        name = abi.EXIT_REASON_NAMES.get(reason, f"exit reason {reason}")
        if reason == abi.KVM_EXIT_SYSTEM_EVENT:
            event = run.exit.system_event.type
            if event in (abi.KVM_SYSTEM_EVENT_SHUTDOWN, abi.KVM_SYSTEM_EVENT_RESET):
                self.stop(Outcome.guest_status(0, "system reset" if event == abi.KVM_SYSTEM_EVENT_RESET else "power off"))
                return
            self.stop(self._crash(f"guest crashed (system event {event})"))
        elif reason == abi.KVM_EXIT_SHUTDOWN:
            self.stop(self._crash("guest triple fault (KVM_EXIT_SHUTDOWN)"))
        elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
            internal = run.exit.internal
            detail = "emulation failure" if internal.suberror == abi.KVM_INTERNAL_ERROR_EMULATION else f"suberror {internal.suberror}"
            data = " ".join(f"0x{internal.data[i]:x}" for i in range(min(internal.ndata, 16)))
            self.stop(self._crash(f"KVM internal error: {detail}" + (f" [{data}]" if data else "")))
        elif reason == abi.KVM_EXIT_FAIL_ENTRY:
            code = run.exit.fail_entry.hardware_entry_failure_reason
            self.stop(self._crash(f"KVM could not enter the guest (hardware reason 0x{code:x})"))
        elif reason == abi.KVM_EXIT_HLT:
            self.stop(Outcome.guest_status(0, "halted"))
        else:
            self.stop(self._crash(f"unexpected {name}"))

    def _crash(self, what: str) -> Outcome:
        """A one-line outcome naming the vCPU and RIP; the full registers go to the debug log."""
        try:
            regs = self.vcpu.get_regs()
            sregs = self.vcpu.get_sregs()
        except OSError:
            return Outcome.crash(f"{what} on vCPU {self.vcpu.index}")
        log.debug("vCPU %d registers at %s:\n%s", self.vcpu.index, what, format_registers(regs, sregs))
        return Outcome.crash(f"{what} on vCPU {self.vcpu.index} at rip=0x{regs.rip:x} (registers: run with -vv)")


def format_registers(regs: abi.KvmRegs, sregs: abi.KvmSregs) -> str:
    general = [f"{name}=0x{getattr(regs, name):016x}" for name, *_ in abi.KvmRegs._fields_]
    control = [f"{name}=0x{getattr(sregs, name):x}" for name in ("cr0", "cr2", "cr3", "cr4", "efer", "apic_base")]
    segments = [f"{name}={getattr(sregs, name).selector:#x}" for name in ("cs", "ds", "ss", "tr")]
    rows = [" ".join(general[i : i + 4]) for i in range(0, len(general), 4)]
    return "\n".join(rows + [" ".join(control + segments)])
