"""The state a vCPU starts in: 64-bit long mode at the kernel entry, as the boot protocol asks.

Only the boot vCPU gets the entry registers; the others stay in wait-for-SIPI until the guest
starts them through its LAPIC, as on real hardware.
"""

from __future__ import annotations

import ctypes

from ..kvm.abi import KvmFpu, KvmLapicState
from ..kvm.vcpu import VcpuFd
from ..memory import GuestMemory
from . import gdt, memory_map, paging

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_WRITEBACK = 6

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def write_boot_tables(memory: GuestMemory) -> int:
    """GDT, empty IDT and identity page tables; returns CR3."""
    memory.write(memory_map.GDT_ADDRESS, gdt.gdt_bytes())
    memory.write_u64(memory_map.IDT_ADDRESS, 0)
    return paging.write_identity_map(memory)


def boot_msrs() -> dict[int, int]:
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_WRITEBACK,
    }


def set_lvt_mode(lapic: KvmLapicState, register: int, mode: int) -> None:
    """Set the delivery mode bits [10:8] of one local vector table register."""
    value = ctypes.c_uint32.from_buffer(lapic, register)
    value.value = (value.value & ~0x700) | (mode << 8)


def configure_common(vcpu: VcpuFd) -> None:
    """MSRs, FPU and LAPIC wiring every vCPU needs, BSP or not."""
    vcpu.set_msrs(boot_msrs())
    fpu = KvmFpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)
    lapic = vcpu.get_lapic()
    # LINT0 carries the PIC's ExtINT, LINT1 the NMI, as a BIOS would leave them.
    set_lvt_mode(lapic, APIC_LVT0, APIC_MODE_EXTINT)
    set_lvt_mode(lapic, APIC_LVT1, APIC_MODE_NMI)
    vcpu.set_lapic(lapic)


def enter_long_mode(vcpu: VcpuFd, cr3: int, entry: int, zero_page: int) -> None:
    sregs = vcpu.get_sregs()
    sregs.gdt.base = memory_map.GDT_ADDRESS
    sregs.gdt.limit = len(gdt.BOOT_GDT) * 8 - 1
    sregs.idt.base = memory_map.IDT_ADDRESS
    sregs.idt.limit = 7
    sregs.cs = gdt.segment(gdt.BOOT_CS)
    data = gdt.segment(gdt.BOOT_DS)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = gdt.segment(gdt.BOOT_TSS)
    sregs.cr3 = cr3
    sregs.cr4 |= CR4_PAE
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    regs.rflags = 0x2  # bit 1 is reserved-set; interrupts off
    regs.rip = entry
    regs.rsp = regs.rbp = memory_map.BOOT_STACK_ADDRESS
    regs.rsi = zero_page
    vcpu.set_regs(regs)
