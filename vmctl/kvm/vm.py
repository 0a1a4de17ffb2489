"""A KVM virtual machine fd: memory slots, irqchip, PIT, irq lines, irqfd and ioeventfd."""

from __future__ import annotations

import os

from . import abi
from .ioctl import ioctl
from .system import Kvm


class VmFd:
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = kvm.create_vm_fd()
        self._next_slot = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_tss_address(self, address: int) -> None:
        ioctl(self.fd, abi.KVM_SET_TSS_ADDR, address)

    def set_identity_map_address(self, address: int) -> None:
        import ctypes

        value = ctypes.c_uint64(address)
        ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, value)

    def add_memory_slot(self, guest_address: int, size: int, host_address: int, read_only: bool = False) -> int:
        slot = self._next_slot
        region = abi.KvmUserspaceMemoryRegion(
            slot=slot,
            flags=abi.KVM_MEM_READONLY if read_only else 0,
            guest_phys_addr=guest_address,
            memory_size=size,
            userspace_addr=host_address,
        )
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)
        self._next_slot += 1
        return slot

    def create_irqchip(self) -> None:
        """PIC + IOAPIC + per-vCPU LAPICs emulated in the kernel (must precede vCPU creation)."""
        ioctl(self.fd, abi.KVM_CREATE_IRQCHIP)

    def create_pit(self) -> None:
        ioctl(self.fd, abi.KVM_CREATE_PIT2, abi.KvmPitConfig(flags=abi.KVM_PIT_SPEAKER_DUMMY))

    def set_irq_line(self, irq: int, level: bool) -> None:
        ioctl(self.fd, abi.KVM_IRQ_LINE, abi.KvmIrqLevel(irq=irq, level=int(level)))

    def register_irqfd(self, eventfd: int, gsi: int) -> None:
        """Writing 1 to `eventfd` injects an edge on `gsi` without leaving the kernel."""
        ioctl(self.fd, abi.KVM_IRQFD, abi.KvmIrqfd(fd=eventfd, gsi=gsi))

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        ioctl(self.fd, abi.KVM_IRQFD, abi.KvmIrqfd(fd=eventfd, gsi=gsi, flags=abi.KVM_IRQFD_FLAG_DEASSIGN))

    def register_ioeventfd(
        self, eventfd: int, address: int, length: int, datamatch: int | None = None, pio: bool = False
    ) -> None:
        """A guest write to `address` signals `eventfd` in the kernel: no exit to userspace."""
        flags = abi.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        ioctl(
            self.fd,
            abi.KVM_IOEVENTFD,
            abi.KvmIoeventfd(datamatch=datamatch or 0, addr=address, len=length, fd=eventfd, flags=flags),
        )

    def signal_msi(self, address: int, data: int) -> None:
        ioctl(
            self.fd,
            abi.KVM_SIGNAL_MSI,
            abi.KvmMsi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data),
        )

    # --- state save/restore (snapshots) ----------------------------------------------------
    def check_extension(self, capability: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (some answers, like KVM_CAP_XSAVE2, are per VM)."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, capability)

    def get_irqchip(self, chip_id: int) -> abi.KvmIrqchip:
        chip = abi.KvmIrqchip(chip_id=chip_id)
        ioctl(self.fd, abi.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: abi.KvmIrqchip) -> None:
        ioctl(self.fd, abi.KVM_SET_IRQCHIP, chip)

    def get_pit(self) -> abi.KvmPitState2:
        state = abi.KvmPitState2()
        ioctl(self.fd, abi.KVM_GET_PIT2, state)
        return state

    def set_pit(self, state: abi.KvmPitState2) -> None:
        ioctl(self.fd, abi.KVM_SET_PIT2, state)

    def get_clock(self) -> abi.KvmClockData:
        clock = abi.KvmClockData()
        ioctl(self.fd, abi.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock_ns: int) -> None:
        """kvmclock continues from `clock_ns` (the guest does not see the time it was saved)."""
        ioctl(self.fd, abi.KVM_SET_CLOCK, abi.KvmClockData(clock=clock_ns))

    def create_vcpu_fd(self, index: int) -> int:
        return ioctl(self.fd, abi.KVM_CREATE_VCPU, index)
