"""A KVM vCPU fd: its shared kvm_run page, registers, MSRs, CPUID, FPU, LAPIC, MP state."""

from __future__ import annotations

import ctypes
import mmap
import os

from . import abi
from .ioctl import ioctl
from .system import cpuid_table
from .vm import VmFd


class VcpuFd:
    def __init__(self, vm: VmFd, index: int) -> None:
        self.index = index
        self.fd = vm.create_vcpu_fd(index)
        size = vm.kvm.vcpu_mmap_size()
        self._run_map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_address = ctypes.addressof(ctypes.c_char.from_buffer(self._run_map))
        # kvm_run is rewritten by the kernel on every exit; this view reads it in place.
        self.run_state = abi.KvmRun.from_address(self._run_address)

    def run_page(self, offset: int, length: int) -> memoryview:
        """Bytes inside the kvm_run mapping (port I/O data lives at io.data_offset)."""
        return memoryview(self._run_map)[offset : offset + length]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def run(self) -> int:
        """Enter the guest until the next exit; returns kvm_run.exit_reason (EINTR raises)."""
        ioctl(self.fd, abi.KVM_RUN)
        reason: int = self.run_state.exit_reason
        return reason

    def get_regs(self) -> abi.KvmRegs:
        regs = abi.KvmRegs()
        ioctl(self.fd, abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.KvmRegs) -> None:
        ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.KvmSregs:
        sregs = abi.KvmSregs()
        ioctl(self.fd, abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.KvmSregs) -> None:
        ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.KvmFpu:
        fpu = abi.KvmFpu()
        ioctl(self.fd, abi.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: abi.KvmFpu) -> None:
        ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def set_cpuid(self, entries: list[abi.KvmCpuidEntry2]) -> None:
        table = abi.kvm_cpuid2(len(entries))(nent=len(entries))
        for i, entry in enumerate(entries):
            table.entries[i] = entry
        ioctl(self.fd, abi.KVM_SET_CPUID2, table)

    def set_msrs(self, values: dict[int, int]) -> None:
        table = abi.kvm_msrs(len(values))(nmsrs=len(values))
        for i, (index, data) in enumerate(values.items()):
            table.entries[i].index = index
            table.entries[i].data = data
        written = ioctl(self.fd, abi.KVM_SET_MSRS, table)
        if written != len(values):
            failed = list(values)[written]
            raise OSError(f"KVM_SET_MSRS stopped at MSR 0x{failed:x} ({written}/{len(values)} set)")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        table = abi.kvm_msrs(len(indices))(nmsrs=len(indices))
        for i, index in enumerate(indices):
            table.entries[i].index = index
        read = ioctl(self.fd, abi.KVM_GET_MSRS, table)
        return {table.entries[i].index: table.entries[i].data for i in range(read)}

    def get_lapic(self) -> abi.KvmLapicState:
        state = abi.KvmLapicState()
        ioctl(self.fd, abi.KVM_GET_LAPIC, state)
        return state

    def set_lapic(self, state: abi.KvmLapicState) -> None:
        ioctl(self.fd, abi.KVM_SET_LAPIC, state)

    def get_mp_state(self) -> int:
        state = abi.KvmMpState()
        ioctl(self.fd, abi.KVM_GET_MP_STATE, state)
        mp_state: int = state.mp_state
        return mp_state

    def set_mp_state(self, value: int) -> None:
        ioctl(self.fd, abi.KVM_SET_MP_STATE, abi.KvmMpState(mp_state=value))

    # --- state save/restore (snapshots) ----------------------------------------------------
    def get_cpuid(self) -> list[abi.KvmCpuidEntry2]:
        return cpuid_table(self.fd, abi.KVM_GET_CPUID2)

    def get_xsave(self, size: int = 4096) -> ctypes.Structure:
        """The XSAVE area; `size` from KVM_CAP_XSAVE2 (above 4 KiB only with AMX-like state)."""
        if size > 4096:
            area = abi.kvm_xsave2(size)()
            ioctl(self.fd, abi.KVM_GET_XSAVE2, area)
        else:
            area = abi.KvmXsave()
            ioctl(self.fd, abi.KVM_GET_XSAVE, area)
        return area

    def set_xsave(self, area: ctypes.Structure) -> None:
        ioctl(self.fd, abi.KVM_SET_XSAVE, area)

    def get_xcrs(self) -> abi.KvmXcrs:
        xcrs = abi.KvmXcrs()
        ioctl(self.fd, abi.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: abi.KvmXcrs) -> None:
        ioctl(self.fd, abi.KVM_SET_XCRS, xcrs)

    def get_vcpu_events(self) -> abi.KvmVcpuEvents:
        events = abi.KvmVcpuEvents()
        ioctl(self.fd, abi.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: abi.KvmVcpuEvents) -> None:
        ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> abi.KvmDebugregs:
        regs = abi.KvmDebugregs()
        ioctl(self.fd, abi.KVM_GET_DEBUGREGS, regs)
        return regs

    def set_debugregs(self, regs: abi.KvmDebugregs) -> None:
        ioctl(self.fd, abi.KVM_SET_DEBUGREGS, regs)

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, abi.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self.fd, abi.KVM_SET_TSC_KHZ, khz)

    def kvmclock_paused(self) -> None:
        """Tell the guest's kvmclock it was paused (no soft-lockup warning); ENOTSUP/EINVAL
        when the guest has not enabled kvmclock, which is fine."""
        ioctl(self.fd, abi.KVM_KVMCLOCK_CTRL)
