"""Build and run one native KVM machine: memory, irqchip, devices, boot state, vCPU threads.

`Machine(config).run()` returns an `Outcome` and always tears everything down (vCPU threads,
fds, guest memory), whether the guest exits, crashes, times out or the user interrupts.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from ..arch import memory_map
from ..arch.cpuid import cpuid_for_vcpu
from ..devices import simple
from ..devices.bus import Bus
from ..devices.serial import COM1_IRQ, COM1_PORT, Serial
from ..errors import VmctlError
from ..guest_contract import AGENT_PORT_WORD, DEFAULT_CMDLINE, EXIT_LINE
from ..kvm.system import Kvm
from ..kvm.vcpu import VcpuFd
from ..kvm.vm import VmFd
from ..limits import MAX_CPUS, MIN_MEMORY
from ..memory import GuestMemory
from ..units import format_size
from .agent import COM2_IRQ, COM2_PORT, UART, VIRTIO_CONSOLE, AgentChannel
from .outcome import EXIT_TIMEOUT, Outcome
from .serial_console import ConsoleInput, ConsoleOutput, ConsoleSink
from .vcpu_thread import VcpuThread, install_kick_handler

if TYPE_CHECKING:  # virtio is imported only when a VM gets a virtio device
    from ..boot.loader import BootInfo
    from ..snapshot.snapshot_file import SnapshotFile
    from ..virtio.slot import VirtioHost

log = logging.getLogger(__name__)

PANIC_MARKER = re.compile(r"Kernel panic - not syncing: (.*)")


class MmioDevice(Protocol):
    """A device in a virtio-mmio slot: bus reads/writes, plus teardown."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def close(self) -> None: ...


class MmioDeviceFactory(Protocol):
    """Creates a device once the VM exists: it gets the machine (as a `VirtioHost`: memory,
    irq lines, ioeventfds), its slot's base address and its interrupt line (GSI)."""

    def attach(self, host: VirtioHost, base: int, gsi: int) -> MmioDevice: ...


VIRTIO_FIRST_GSI = 5  # ISA IRQs 0-4 are the PIT, keyboard, cascade, COM2 and COM1
MAX_MMIO_DEVICES = 19  # GSIs 5..23 of the IOAPIC


@dataclass
class MachineConfig:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = DEFAULT_CMDLINE
    cpus: int = 1
    memory: int = 256 << 20
    memory_backing: str = "anonymous"
    memory_merge: bool = False  # guest RAM MADV_MERGEABLE: the host's KSM may merge identical pages
    console_sinks: list[ConsoleSink] = field(default_factory=list)
    interactive: bool = False  # forward stdin to the serial console
    timeout: float | None = None
    devices: Sequence[MmioDeviceFactory] = field(default_factory=list)  # virtio-mmio slots, in order
    agent: bool = False  # a second UART (COM2) for the guest agent's exec channel
    # ...and a virtio-console port for it, in the slot after `devices` (the guest agent
    # prefers it; the UART stays for kernels without virtio-console)
    agent_console: bool = False
    # Called once every fd is open, just before the vCPUs start: where vmm/sandbox.py goes in.
    before_start: Callable[[], None] | None = None

    def validate(self) -> None:
        if not 1 <= self.cpus <= MAX_CPUS:
            raise VmctlError(f"cpus: {self.cpus} is out of range 1..{MAX_CPUS}")
        if self.memory < MIN_MEMORY:
            raise VmctlError(f"memory: {format_size(self.memory)} is below the minimum of {format_size(MIN_MEMORY)}")
        if self.memory % 4096:
            raise VmctlError(f"memory: {self.memory} bytes is not a multiple of 4 KiB")
        if self.slot_count > MAX_MMIO_DEVICES:
            raise VmctlError(f"devices: {self.slot_count} virtio devices (the agent's port included), "
                             f"at most {MAX_MMIO_DEVICES} fit")
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path is not None and not Path(path).is_file():
                raise VmctlError(f"{what}: {path}: no such file")

    @property
    def has_agent_port(self) -> bool:
        return self.agent and self.agent_console

    @property
    def slot_count(self) -> int:
        """virtio-mmio slots: the configured devices, then the agent's port."""
        return len(self.devices) + self.has_agent_port


class Machine:
    def __init__(self, config: MachineConfig, restore_from: "SnapshotFile | None" = None) -> None:
        """`restore_from`: a checked snapshot (`vmctl.snapshot.snapshot_file.read_snapshot`): the machine
        continues that guest instead of booting `config.kernel` (devices still come from
        `config`, slot by slot as saved: a clone gets its own disks and network)."""
        if restore_from is None:
            config.validate()
        self.config = config
        self.restore_from = restore_from
        self._outcome: Outcome | None = None
        self._outcome_lock = threading.Lock()
        self._stopping = threading.Event()
        self.running = threading.Event()  # built (or restored) and its vCPUs started
        self._guest_status: int | None = None
        self._panic: str | None = None
        self.kvm: Kvm | None = None
        self.vm: VmFd | None = None
        self.memory: GuestMemory | None = None
        self.vcpus: list[VcpuFd] = []
        self.threads: list[VcpuThread] = []
        self._eventfds: list[int] = []
        self.console = ConsoleOutput(config.console_sinks, on_line=self._watch_console)
        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.serial: Serial | None = None
        self.agent: AgentChannel | None = AgentChannel() if config.agent else None
        self.agent_serial: Serial | None = None
        self.boot: BootInfo | None = None
        self.mmio_devices: list[MmioDevice] = []
        self._next_device_memory = memory_map.device_memory_base(config.memory)

    # --- life cycle ------------------------------------------------------------------------
    def run(self) -> Outcome:
        console_input = None
        try:
            self._build()
            install_kick_handler()
            if self.config.before_start is not None:
                self.config.before_start()
            if self.config.interactive:
                console_input = ConsoleInput(self.serial.feed, lambda: self.stop(Outcome(0, "stopped from the console (Ctrl-A x)")))
                console_input.start()
            for thread in self.threads:
                thread.start()
            self.running.set()
            if not self._stopping.wait(self.config.timeout):
                self.stop(Outcome(EXIT_TIMEOUT, f"timed out after {self.config.timeout:g} s"))
            return self._outcome
        except KeyboardInterrupt:
            self.stop(Outcome(130, "interrupted"))
            raise
        finally:
            if console_input:
                console_input.stop()
            self.close()

    def stop(self, outcome: Outcome) -> None:
        """First caller wins: its outcome is the VM's. Every vCPU is then pulled out of KVM_RUN."""
        with self._outcome_lock:
            if self._outcome is None:
                self._outcome = self._refine(outcome)
        self._stopping.set()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.kick()

    def close(self) -> None:
        self._stopping.set()
        for thread in self.threads:
            thread.kick()
        for thread in self.threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=5)
        self.console.flush()
        for device in self.mmio_devices:
            device.close()
        self.mmio_devices.clear()
        for vcpu in self.vcpus:
            vcpu.close()
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds.clear()
        if self.vm:
            self.vm.close()
        if self.memory:
            self.memory.close()
            self.memory = None
        if self.kvm:
            self.kvm.close()

    # --- pause, snapshot (vmm/save_restore.py does the saving) -------------------------------------
    def pause(self, timeout: float = 10.0) -> None:
        """Park every vCPU outside KVM_RUN with its state complete; raises when one does not
        park (the machine is then resumed)."""
        if self._stopping.is_set():
            raise VmctlError("the machine is stopping")
        for thread in self.threads:
            thread.request_pause()
        if not all(thread.wait_parked(timeout) for thread in self.threads):
            self.resume()
            raise VmctlError(f"the vCPUs did not pause within {timeout:g} s")
        if self._stopping.is_set():
            self.resume()
            raise VmctlError("the machine stopped while pausing")

    def resume(self) -> None:
        for thread in self.threads:
            thread.resume()

    def snapshot(self, path: Path, extra: dict | None = None, then: str = "resume",
                 while_paused: "Callable[[], None] | None" = None, save_memory: bool = True) -> dict:
        """Save the whole running machine into the snapshot directory `path` (see
        vmctl/snapshot/snapshot_file.py); `then` is "resume" or "stop". `while_paused` runs with the
        guest paused and the devices quiesced (disk layer switches); without `save_memory`
        only that happens. Returns a summary."""
        from .save_restore import save_machine

        return save_machine(self, Path(path), extra or {}, then, while_paused, save_memory)

    @property
    def exits(self) -> int:
        return sum(thread.exits for thread in self.threads)

    # --- construction ----------------------------------------------------------------------
    def _build(self) -> None:
        if self.restore_from is not None:
            from .save_restore import build_restored

            build_restored(self, self.restore_from)
            return
        # The boot path's modules only for a boot: a restored VMM never loads a kernel, and
        # each module is start-up time (seconds, in the nested host).
        from ..arch import vcpu_setup
        from ..arch.mptable import build_mptable
        from ..boot.loader import load_linux

        config = self.config
        self.kvm = Kvm()
        self.vm = VmFd(self.kvm)
        self.vm.set_tss_address(memory_map.KVM_TSS_ADDRESS)
        self.vm.set_identity_map_address(memory_map.KVM_IDENTITY_MAP_ADDRESS)
        self.vm.create_irqchip()
        self.vm.create_pit()

        self.memory = GuestMemory(memory_map.ram_layout(config.memory), config.memory_backing)
        if config.memory_merge:
            self.memory.make_mergeable()
        for region in self.memory.regions:
            self.vm.add_memory_slot(region.guest_address, region.size, region.host_address)

        cmdline = " ".join([config.cmdline, *self._add_mmio_devices()])
        self.boot = load_linux(self.memory, Path(config.kernel), Path(config.initrd) if config.initrd else None, cmdline)
        cr3 = vcpu_setup.write_boot_tables(self.memory)
        mptable = build_mptable(config.cpus)
        self.memory.write(mptable.address, mptable.data)
        self._add_legacy_devices()

        supported = self.kvm.supported_cpuid()
        for index in range(config.cpus):
            vcpu = VcpuFd(self.vm, index)
            vcpu.set_cpuid(cpuid_for_vcpu(supported, index, config.cpus))
            vcpu_setup.configure_common(vcpu)
            if index == 0:
                vcpu_setup.enter_long_mode(vcpu, cr3, self.boot.entry, self.boot.zero_page_address)
            self.vcpus.append(vcpu)
            self.threads.append(VcpuThread(vcpu, self.pio, self.mmio, self.stop, self._stopping))
        log.info(
            "booting %s %s: %d vCPU(s), %s, entry 0x%x",
            self.boot.kernel.kind, config.kernel, config.cpus, format_size(config.memory), self.boot.entry,
        )

    # --- VirtioHost: what a virtio slot uses ---------------------------------------------------
    def guest_memory(self) -> GuestMemory:
        assert self.memory is not None, "the machine is not built"
        return self.memory

    def vcpu_count(self) -> int:
        return self.config.cpus

    def register_ioeventfd(self, eventfd: int, address: int, length: int, datamatch: int | None = None) -> None:
        assert self.vm is not None, "the machine is not built"
        self.vm.register_ioeventfd(eventfd, address, length, datamatch=datamatch)

    def map_device_memory(self, host_address: int, size: int) -> int:
        """A read-only memory slot for a device's region (virtio-pmem), above RAM and the
        device range, in attach order: a restored machine gets the same addresses again."""
        assert self.vm is not None, "the machine is not built"
        guest_address = self._next_device_memory
        self.vm.add_memory_slot(guest_address, size, host_address, read_only=True)
        self._next_device_memory = memory_map.align_device_memory(guest_address + size)
        log.info("device memory: %s at 0x%x (read-only)", format_size(size), guest_address)
        return guest_address

    def irq_line(self, gsi: int) -> "IrqLine":
        """An edge-triggered interrupt line: writing the eventfd injects `gsi` in the kernel."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._eventfds.append(fd)
        self.vm.register_irqfd(fd, gsi)
        return IrqLine(fd, gsi)

    def _add_mmio_devices(self) -> list[str]:
        """Attach each configured device to its 4 KiB slot; returns the kernel cmdline words
        that declare them (virtio_mmio.device=<size>@<base>:<irq>)."""
        words = []
        factories = list(self.config.devices)
        if self.config.has_agent_port:
            factories.append(self._agent_port())
        for index, factory in enumerate(factories):
            base = memory_map.VIRTIO_MMIO_BASE + index * memory_map.VIRTIO_MMIO_SLOT_SIZE
            gsi = VIRTIO_FIRST_GSI + index
            device = factory.attach(self, base, gsi)
            self.mmio_devices.append(device)
            self.mmio.register(base, memory_map.VIRTIO_MMIO_SLOT_SIZE, device)
            words.append(f"virtio_mmio.device=4K@0x{base:x}:{gsi}")
        if self.config.has_agent_port:
            from ..virtio.device import ID_CONSOLE

            # Linux numbers virtio consoles hvc0, hvc1... in slot order: ours is the last.
            earlier = sum(getattr(getattr(d, "device", None), "device_id", None) == ID_CONSOLE
                          for d in self.mmio_devices[:-1])
            words.append(f"{AGENT_PORT_WORD}=hvc{earlier}")
        return words

    def _agent_port(self) -> MmioDeviceFactory:
        """The agent's virtio-console port: guest output feeds the agent channel directly."""
        from ..virtio.console_port import ConsolePort
        from ..virtio.slot import VirtioMmioFactory

        agent = self.agent
        assert agent is not None, "the agent port comes with the agent"

        def make() -> ConsolePort:
            port = ConsolePort(lambda data: None, "agent-console")
            port.on_output = agent.link(VIRTIO_CONSOLE, port.feed)
            return port
        return VirtioMmioFactory(make, "agent-console")

    def _add_legacy_devices(self) -> None:
        self.serial = Serial(self.console, self.irq_line(COM1_IRQ).trigger)
        self.pio.register(COM1_PORT, 8, self.serial)
        if self.agent is not None:
            serial = Serial(lambda data: None, self.irq_line(COM2_IRQ).trigger)
            serial.output = self.agent.link(UART, serial.feed)
            self.agent_serial = serial
            self.pio.register(COM2_PORT, 8, self.agent_serial)
        self.pio.register(simple.I8042_DATA_PORT, 5, simple.I8042(self._on_reset))
        self.pio.register(simple.EXIT_PORT, 4, simple.ExitPort(self._on_exit_port))
        self.pio.register(simple.IO_DELAY_PORT, 1, simple.Sink())

    # --- how the guest ends ----------------------------------------------------------------
    def _on_reset(self) -> None:
        self.stop(Outcome.guest_status(0, "i8042 reset"))

    def _on_exit_port(self, value: int) -> None:
        self.stop(Outcome.guest_status(value, f"exit port 0x{simple.EXIT_PORT:x}"))

    def _watch_console(self, line: str) -> None:
        if match := EXIT_LINE.match(line):
            self._guest_status = int(match.group(1)) & 0xFF
        elif match := PANIC_MARKER.search(line):
            self._panic = match.group(1).strip()

    def _refine(self, outcome: Outcome) -> Outcome:
        """A reset after a kernel panic is a crash; a reset after VMCTL-EXIT carries its status."""
        if outcome.crashed or outcome.exit_code != 0:
            return outcome
        if self._panic is not None:
            return Outcome.crash(f"guest kernel panic: {self._panic}")
        if self._guest_status is not None:
            return Outcome.guest_status(self._guest_status, "VMCTL-EXIT on the console")
        return outcome


@dataclass(frozen=True)
class IrqLine:
    eventfd: int
    gsi: int

    def trigger(self) -> None:
        try:
            os.eventfd_write(self.eventfd, 1)
        except BlockingIOError:
            pass  # counter saturated: an interrupt is already pending


def default_console_sinks(log_path: Path | None, quiet: bool) -> list[ConsoleSink]:
    sinks: list[ConsoleSink] = []
    if not quiet:
        sinks.append(sys.stdout.buffer)
    if log_path is not None:
        sinks.append(open(log_path, "ab", buffering=0))
    return sinks
