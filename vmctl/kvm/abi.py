"""The KVM userspace ABI (<linux/kvm.h>, x86-64): ioctl numbers, structs and constants.

Everything vmctl passes to /dev/kvm is declared here, once. Layouts are checked against the
kernel headers by tests/unit/test_kvm_abi.py (a C program prints sizeof/offsetof).
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64

# --- ioctl number encoding (asm-generic/ioctl.h) -------------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type | int) -> int:
    return _ioc(_IOC_READ, nr, struct if isinstance(struct, int) else ctypes.sizeof(struct))


def _iow(nr: int, struct: type | int) -> int:
    return _ioc(_IOC_WRITE, nr, struct if isinstance(struct, int) else ctypes.sizeof(struct))


def _iowr(nr: int, struct: type | int) -> int:
    size = struct if isinstance(struct, int) else ctypes.sizeof(struct)
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# --- structs -------------------------------------------------------------------------------
class KvmRegs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    _fields_ = [
        ("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment),
        ("gs", KvmSegment), ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment),
        ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", c_uint64), ("cr2", c_uint64), ("cr3", c_uint64), ("cr4", c_uint64),
        ("cr8", c_uint64), ("efer", c_uint64), ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmFpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class KvmMsrsHeader(ctypes.Structure):
    """struct kvm_msrs without its flexible entries[] array."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


def kvm_msrs(count: int) -> type[ctypes.Structure]:
    class KvmMsrs(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", KvmMsrEntry * count)]

    return KvmMsrs


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class KvmCpuid2Header(ctypes.Structure):
    """struct kvm_cpuid2 without its flexible entries[] array."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


def kvm_cpuid2(count: int) -> type[ctypes.Structure]:
    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", KvmCpuidEntry2 * count)]

    return KvmCpuid2


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class KvmIrqfd(ctypes.Structure):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class KvmIoeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class KvmIrqRoutingIrqchip(ctypes.Structure):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class KvmIrqRoutingMsi(ctypes.Structure):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("devid", c_uint32),
    ]


class _KvmIrqRoutingUnion(ctypes.Union):
    _fields_ = [("irqchip", KvmIrqRoutingIrqchip), ("msi", KvmIrqRoutingMsi), ("pad", c_uint32 * 8)]


class KvmIrqRoutingEntry(ctypes.Structure):
    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", _KvmIrqRoutingUnion),
    ]


class KvmIrqRoutingHeader(ctypes.Structure):
    """struct kvm_irq_routing without its flexible entries[] array."""

    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]


def kvm_irq_routing(count: int) -> type[ctypes.Structure]:
    class KvmIrqRouting(ctypes.Structure):
        _fields_ = [("nr", c_uint32), ("flags", c_uint32), ("entries", KvmIrqRoutingEntry * count)]

    return KvmIrqRouting


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class KvmLapicState(ctypes.Structure):
    _fields_ = [("regs", c_uint8 * 1024)]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class KvmMsi(ctypes.Structure):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


# --- state save/restore (snapshots) --------------------------------------------------------
class KvmMsrListHeader(ctypes.Structure):
    """struct kvm_msr_list without its flexible indices[] array."""

    _fields_ = [("nmsrs", c_uint32)]


def kvm_msr_list(count: int) -> type[ctypes.Structure]:
    class KvmMsrList(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * count)]

    return KvmMsrList


class KvmPicState(ctypes.Structure):
    _fields_ = [
        (name, c_uint8)
        for name in (
            "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
            "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested_mode",
            "init4", "elcr", "elcr_mask",
        )
    ]


KVM_IOAPIC_NUM_PINS = 24


class KvmIoapicState(ctypes.Structure):
    # redirtbl entries are a union of a u64 and bit fields: the u64 view is enough to save them.
    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", c_uint64 * KVM_IOAPIC_NUM_PINS),
    ]


class _KvmIrqchipUnion(ctypes.Union):
    _fields_ = [("dummy", c_uint8 * 512), ("pic", KvmPicState), ("ioapic", KvmIoapicState)]


class KvmIrqchip(ctypes.Structure):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _KvmIrqchipUnion)]


class KvmPitChannelState(ctypes.Structure):
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", ctypes.c_int64),
    ]


class KvmPitState2(ctypes.Structure):
    _fields_ = [("channels", KvmPitChannelState * 3), ("flags", c_uint32), ("reserved", c_uint32 * 9)]


class KvmClockData(ctypes.Structure):
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


KVM_CLOCK_TSC_STABLE = 2


class _KvmVcpuEventsException(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("has_error_code", c_uint8), ("pending", c_uint8),
                ("error_code", c_uint32)]


class _KvmVcpuEventsInterrupt(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _KvmVcpuEventsNmi(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _KvmVcpuEventsSmi(ctypes.Structure):
    _fields_ = [("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8), ("latched_init", c_uint8)]


class KvmVcpuEvents(ctypes.Structure):
    _fields_ = [
        ("exception", _KvmVcpuEventsException),
        ("interrupt", _KvmVcpuEventsInterrupt),
        ("nmi", _KvmVcpuEventsNmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _KvmVcpuEventsSmi),
        ("triple_fault", c_uint8),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8


class KvmDebugregs(ctypes.Structure):
    _fields_ = [("db", c_uint64 * 4), ("dr6", c_uint64), ("dr7", c_uint64), ("flags", c_uint64),
                ("reserved", c_uint64 * 9)]


class KvmXsave(ctypes.Structure):
    """struct kvm_xsave: the 4 KiB legacy region (KVM_GET_XSAVE2 may need more: see kvm_xsave2)."""

    _fields_ = [("region", c_uint32 * 1024)]


def kvm_xsave2(size: int) -> type[ctypes.Structure]:
    """A kvm_xsave of `size` bytes (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM fd)."""

    class KvmXsave2(ctypes.Structure):
        _fields_ = [("region", c_uint32 * (max(size, 4096) // 4))]

    return KvmXsave2


KVM_MAX_XCRS = 16


class KvmXcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class KvmXcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32), ("xcrs", KvmXcr * KVM_MAX_XCRS),
                ("padding", c_uint64 * 16)]


# --- struct kvm_run: the page shared with the kernel for each vCPU -------------------------
class KvmRunExitIo(ctypes.Structure):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class KvmRunExitMmio(ctypes.Structure):
    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class KvmRunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class KvmRunInternal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class KvmRunSystemEvent(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class KvmRunException(ctypes.Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class _KvmRunExitUnion(ctypes.Union):
    _fields_ = [
        ("hw", c_uint64),
        ("fail_entry", KvmRunFailEntry),
        ("ex", KvmRunException),
        ("io", KvmRunExitIo),
        ("mmio", KvmRunExitMmio),
        ("internal", KvmRunInternal),
        ("system_event", KvmRunSystemEvent),
        ("padding", ctypes.c_char * 256),
    ]


class KvmRun(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("exit", _KvmRunExitUnion),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
    ]


# Exit reasons (KVM_EXIT_*).
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_REASON_NAMES = {
    value: name
    for name, value in globals().items()
    if name.startswith("KVM_EXIT_") and isinstance(value, int) and not name.startswith("KVM_EXIT_IO_")
}

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_INTERNAL_ERROR_EMULATION = 1

# --- capabilities (KVM_CAP_*) --------------------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_XSAVE2 = 208

KVM_API_VERSION = 12

# --- ioctl numbers -------------------------------------------------------------------------
# System (/dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, KvmMsrListHeader)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, KvmCpuid2Header)
# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, ctypes.sizeof(c_uint64))
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, KvmIrqLevel)
KVM_GET_IRQCHIP = _iowr(0x62, KvmIrqchip)
KVM_SET_IRQCHIP = _ior(0x63, KvmIrqchip)
KVM_SET_GSI_ROUTING = _iow(0x6A, KvmIrqRoutingHeader)
KVM_IRQFD = _iow(0x76, KvmIrqfd)
KVM_CREATE_PIT2 = _iow(0x77, KvmPitConfig)
KVM_IOEVENTFD = _iow(0x79, KvmIoeventfd)
KVM_SET_CLOCK = _iow(0x7B, KvmClockData)
KVM_GET_CLOCK = _ior(0x7C, KvmClockData)
KVM_GET_PIT2 = _ior(0x9F, KvmPitState2)
KVM_SET_PIT2 = _iow(0xA0, KvmPitState2)
KVM_SIGNAL_MSI = _iow(0xA5, KvmMsi)
# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, KvmRegs)
KVM_SET_REGS = _iow(0x82, KvmRegs)
KVM_GET_SREGS = _ior(0x83, KvmSregs)
KVM_SET_SREGS = _iow(0x84, KvmSregs)
KVM_GET_MSRS = _iowr(0x88, KvmMsrsHeader)
KVM_SET_MSRS = _iow(0x89, KvmMsrsHeader)
KVM_GET_FPU = _ior(0x8C, KvmFpu)
KVM_SET_FPU = _iow(0x8D, KvmFpu)
KVM_GET_LAPIC = _ior(0x8E, KvmLapicState)
KVM_SET_LAPIC = _iow(0x8F, KvmLapicState)
KVM_SET_CPUID2 = _iow(0x90, KvmCpuid2Header)
KVM_GET_CPUID2 = _iowr(0x91, KvmCpuid2Header)
KVM_GET_MP_STATE = _ior(0x98, KvmMpState)
KVM_SET_MP_STATE = _iow(0x99, KvmMpState)
KVM_GET_VCPU_EVENTS = _ior(0x9F, KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, KvmVcpuEvents)
KVM_GET_DEBUGREGS = _ior(0xA1, KvmDebugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, KvmDebugregs)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, KvmXsave)
KVM_SET_XSAVE = _iow(0xA5, KvmXsave)
KVM_GET_XCRS = _ior(0xA6, KvmXcrs)
KVM_SET_XCRS = _iow(0xA7, KvmXcrs)
KVM_KVMCLOCK_CTRL = _io(0xAD)
KVM_GET_XSAVE2 = _ior(0xCF, KvmXsave)

KVM_MEM_READONLY = 1 << 1

# Structs whose layout tests/unit/test_kvm_abi.py compares with the C headers:
# Python name -> C type name.
CHECKED_STRUCTS: dict[str, tuple[type[ctypes.Structure], str]] = {
    "KvmRegs": (KvmRegs, "struct kvm_regs"),
    "KvmSegment": (KvmSegment, "struct kvm_segment"),
    "KvmDtable": (KvmDtable, "struct kvm_dtable"),
    "KvmSregs": (KvmSregs, "struct kvm_sregs"),
    "KvmFpu": (KvmFpu, "struct kvm_fpu"),
    "KvmMsrEntry": (KvmMsrEntry, "struct kvm_msr_entry"),
    "KvmMsrsHeader": (KvmMsrsHeader, "struct kvm_msrs"),
    "KvmCpuidEntry2": (KvmCpuidEntry2, "struct kvm_cpuid_entry2"),
    "KvmCpuid2Header": (KvmCpuid2Header, "struct kvm_cpuid2"),
    "KvmUserspaceMemoryRegion": (KvmUserspaceMemoryRegion, "struct kvm_userspace_memory_region"),
    "KvmIrqLevel": (KvmIrqLevel, "struct kvm_irq_level"),
    "KvmPitConfig": (KvmPitConfig, "struct kvm_pit_config"),
    "KvmIrqfd": (KvmIrqfd, "struct kvm_irqfd"),
    "KvmIoeventfd": (KvmIoeventfd, "struct kvm_ioeventfd"),
    "KvmIrqRoutingEntry": (KvmIrqRoutingEntry, "struct kvm_irq_routing_entry"),
    "KvmIrqRoutingHeader": (KvmIrqRoutingHeader, "struct kvm_irq_routing"),
    "KvmLapicState": (KvmLapicState, "struct kvm_lapic_state"),
    "KvmMpState": (KvmMpState, "struct kvm_mp_state"),
    "KvmMsi": (KvmMsi, "struct kvm_msi"),
    "KvmRun": (KvmRun, "struct kvm_run"),
    "KvmMsrListHeader": (KvmMsrListHeader, "struct kvm_msr_list"),
    "KvmPicState": (KvmPicState, "struct kvm_pic_state"),
    "KvmIoapicState": (KvmIoapicState, "struct kvm_ioapic_state"),
    "KvmIrqchip": (KvmIrqchip, "struct kvm_irqchip"),
    "KvmPitChannelState": (KvmPitChannelState, "struct kvm_pit_channel_state"),
    "KvmPitState2": (KvmPitState2, "struct kvm_pit_state2"),
    "KvmClockData": (KvmClockData, "struct kvm_clock_data"),
    "KvmVcpuEvents": (KvmVcpuEvents, "struct kvm_vcpu_events"),
    "KvmDebugregs": (KvmDebugregs, "struct kvm_debugregs"),
    "KvmXsave": (KvmXsave, "struct kvm_xsave"),
    "KvmXcr": (KvmXcr, "struct kvm_xcr"),
    "KvmXcrs": (KvmXcrs, "struct kvm_xcrs"),
}
