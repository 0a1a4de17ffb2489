"""Everything KVM holds for a paused VM, read and written through the ioctls, as dataclasses.

`VcpuState.save(vcpu, msrs)` / `.restore(vcpu)` cover a vCPU: CPUID, registers, sregs, FPU and
XSAVE, XCRs, debug registers, MSRs, LAPIC, pending events, MP state and TSC frequency.
`VmState` covers the in-kernel devices of the VM: both PICs, the IOAPIC, the PIT and kvmclock.
`to_json()` / `from_json()` give the snapshot file's JSON; decoding names the bad field.

The vCPU must be out of KVM_RUN, and must have re-entered it once with immediate_exit set
after its last I/O exit (KVM completes a pending port/MMIO read only on the next KVM_RUN),
before `save` runs: `vmm.vcpu_thread` parks vCPUs that way.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from typing import Any

from . import abi
from .state_json import StateError, decode, encode, from_hex, to_hex
from .vcpu import VcpuFd
from .vm import VmFd

# MSRs KVM handles but leaves out of KVM_GET_MSR_INDEX_LIST (QEMU saves them by name too):
# the MTRRs, which vmctl sets at boot and Linux reprograms.
MTRR_MSRS = [0x2FF, 0x250, 0x258, 0x259, *range(0x268, 0x270), *range(0x200, 0x210)]
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0


def msrs_to_save(index_list: list[int]) -> list[int]:
    """The MSRs a snapshot saves, in restore order: the TSC before the deadline timer that is
    relative to it (KVM would otherwise arm the timer against the old TSC)."""
    ordered = [index for index in dict.fromkeys([*index_list, *MTRR_MSRS]) if index != MSR_IA32_TSC_DEADLINE]
    if MSR_IA32_TSC_DEADLINE in index_list:
        ordered.append(MSR_IA32_TSC_DEADLINE)
    return ordered


def read_msrs(vcpu: VcpuFd, indices: list[int]) -> list[tuple[int, int]]:
    """Every readable MSR of `indices`: KVM_GET_MSRS stops at the first one it refuses, so
    that one is skipped and the read goes on from the next."""
    values: list[tuple[int, int]] = []
    rest = list(indices)
    while rest:
        got = vcpu.get_msrs(rest)
        values.extend(got.items())
        rest = rest[len(got) + 1 :]
    return values


@dataclass
class VcpuState:
    index: int
    cpuid: list[abi.KvmCpuidEntry2]
    regs: abi.KvmRegs
    sregs: abi.KvmSregs
    fpu: abi.KvmFpu
    xsave: ctypes.Structure
    xcrs: abi.KvmXcrs
    debugregs: abi.KvmDebugregs
    msrs: list[tuple[int, int]]
    lapic: abi.KvmLapicState
    events: abi.KvmVcpuEvents
    mp_state: int
    tsc_khz: int

    @classmethod
    def save(cls, vcpu: VcpuFd, msr_indices: list[int], xsave_size: int) -> "VcpuState":
        # Firecracker's order: the MP state first (reading it may complete a pending INIT/SIPI).
        mp_state = vcpu.get_mp_state()
        return cls(
            index=vcpu.index, cpuid=vcpu.get_cpuid(), regs=vcpu.get_regs(), sregs=vcpu.get_sregs(),
            fpu=vcpu.get_fpu(), xsave=vcpu.get_xsave(xsave_size), xcrs=vcpu.get_xcrs(),
            debugregs=vcpu.get_debugregs(), msrs=read_msrs(vcpu, msr_indices), lapic=vcpu.get_lapic(),
            events=vcpu.get_vcpu_events(), mp_state=mp_state, tsc_khz=vcpu.get_tsc_khz(),
        )

    def restore(self, vcpu: VcpuFd) -> None:
        """Write the state into a fresh vCPU. The order matters: CPUID first (it decides which
        MSRs and XSAVE components exist), sregs before the MSRs (EFER), the LAPIC before the
        events and MP state that refer to it, the TSC frequency before the TSC MSR."""
        vcpu.set_cpuid(self.cpuid)
        if self.tsc_khz and vcpu.get_tsc_khz() != self.tsc_khz:
            try:
                vcpu.set_tsc_khz(self.tsc_khz)
            except OSError:
                raise StateError(f"vCPU {self.index}: the snapshot's TSC runs at {self.tsc_khz} kHz, this host's at "
                                 f"{vcpu.get_tsc_khz()} kHz, and KVM cannot scale it") from None
        vcpu.set_sregs(self.sregs)
        vcpu.set_regs(self.regs)
        vcpu.set_fpu(self.fpu)
        vcpu.set_xsave(self.xsave)
        vcpu.set_xcrs(self.xcrs)
        vcpu.set_debugregs(self.debugregs)
        vcpu.set_lapic(self.lapic)
        if self.msrs:
            vcpu.set_msrs(dict(self.msrs))
        events = abi.KvmVcpuEvents.from_buffer_copy(self.events)
        events.flags &= abi.KVM_VCPUEVENT_VALID_NMI_PENDING | abi.KVM_VCPUEVENT_VALID_SIPI_VECTOR \
            | abi.KVM_VCPUEVENT_VALID_SHADOW | abi.KVM_VCPUEVENT_VALID_SMM
        vcpu.set_vcpu_events(events)
        vcpu.set_mp_state(self.mp_state)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "cpuid": [encode(entry) for entry in self.cpuid],
            "regs": encode(self.regs),
            "sregs": encode(self.sregs),
            "fpu": encode(self.fpu),
            "xsave": to_hex(self.xsave),
            "xcrs": encode(self.xcrs),
            "debugregs": encode(self.debugregs),
            "msrs": [[index, value] for index, value in self.msrs],
            "lapic": to_hex(self.lapic),
            "events": encode(self.events),
            "mp_state": self.mp_state,
            "tsc_khz": self.tsc_khz,
        }

    @classmethod
    def from_json(cls, data: Any, path: str = "vcpus[0]") -> "VcpuState":
        _require_object(data, path, ["index", "cpuid", "regs", "sregs", "fpu", "xsave", "xcrs", "debugregs", "msrs",
                                     "lapic", "events", "mp_state", "tsc_khz"])
        if not isinstance(data["cpuid"], list) or not data["cpuid"]:
            raise StateError(f"{path}.cpuid: expected a non-empty list")
        xsave_hex = data["xsave"]
        xsave_size = len(xsave_hex) // 2 if isinstance(xsave_hex, str) else 0
        if xsave_size < 4096 or xsave_size % 4:
            raise StateError(f"{path}.xsave: {xsave_size} bytes, expected at least 4096")
        xsave_kind = abi.KvmXsave if xsave_size == 4096 else abi.kvm_xsave2(xsave_size)
        msrs = data["msrs"]
        if not isinstance(msrs, list) or not all(
                isinstance(m, list) and len(m) == 2 and all(isinstance(v, int) and 0 <= v < 1 << 64 for v in m)
                for m in msrs):
            raise StateError(f"{path}.msrs: expected a list of [index, value] pairs of 64-bit integers")
        return cls(
            index=_int(data["index"], f"{path}.index", 0, 1023),
            cpuid=[decode(abi.KvmCpuidEntry2, entry, f"{path}.cpuid[{i}]") for i, entry in enumerate(data["cpuid"])],
            regs=decode(abi.KvmRegs, data["regs"], f"{path}.regs"),
            sregs=decode(abi.KvmSregs, data["sregs"], f"{path}.sregs"),
            fpu=decode(abi.KvmFpu, data["fpu"], f"{path}.fpu"),
            xsave=from_hex(xsave_kind, xsave_hex, f"{path}.xsave"),
            xcrs=decode(abi.KvmXcrs, data["xcrs"], f"{path}.xcrs"),
            debugregs=decode(abi.KvmDebugregs, data["debugregs"], f"{path}.debugregs"),
            msrs=[(index, value) for index, value in msrs],
            lapic=from_hex(abi.KvmLapicState, data["lapic"], f"{path}.lapic"),
            events=decode(abi.KvmVcpuEvents, data["events"], f"{path}.events"),
            mp_state=_int(data["mp_state"], f"{path}.mp_state", 0, 0xFFFFFFFF),
            tsc_khz=_int(data["tsc_khz"], f"{path}.tsc_khz", 0, 0xFFFFFFFF),
        )


@dataclass
class VmState:
    pic_master: abi.KvmPicState
    pic_slave: abi.KvmPicState
    ioapic: abi.KvmIoapicState
    pit: abi.KvmPitState2
    clock_ns: int

    @classmethod
    def save(cls, vm: VmFd) -> "VmState":
        return cls(
            pic_master=_copy(vm.get_irqchip(abi.KVM_IRQCHIP_PIC_MASTER).chip.pic),
            pic_slave=_copy(vm.get_irqchip(abi.KVM_IRQCHIP_PIC_SLAVE).chip.pic),
            ioapic=_copy(vm.get_irqchip(abi.KVM_IRQCHIP_IOAPIC).chip.ioapic),
            pit=vm.get_pit(),
            clock_ns=vm.get_clock().clock,
        )

    def restore(self, vm: VmFd) -> None:
        """Into a VM with an irqchip and a PIT; call after the vCPUs are restored and before
        they run, so kvmclock starts from the saved time."""
        for chip_id, chip in ((abi.KVM_IRQCHIP_PIC_MASTER, self.pic_master), (abi.KVM_IRQCHIP_PIC_SLAVE, self.pic_slave)):
            holder = abi.KvmIrqchip(chip_id=chip_id)
            holder.chip.pic = chip
            vm.set_irqchip(holder)
        holder = abi.KvmIrqchip(chip_id=abi.KVM_IRQCHIP_IOAPIC)
        holder.chip.ioapic = self.ioapic
        vm.set_irqchip(holder)
        vm.set_pit(self.pit)
        vm.set_clock(self.clock_ns)

    def to_json(self) -> dict[str, Any]:
        return {"pic_master": encode(self.pic_master), "pic_slave": encode(self.pic_slave),
                "ioapic": encode(self.ioapic), "pit": encode(self.pit), "clock_ns": self.clock_ns}

    @classmethod
    def from_json(cls, data: Any, path: str = "vm") -> "VmState":
        _require_object(data, path, ["pic_master", "pic_slave", "ioapic", "pit", "clock_ns"])
        return cls(
            pic_master=decode(abi.KvmPicState, data["pic_master"], f"{path}.pic_master"),
            pic_slave=decode(abi.KvmPicState, data["pic_slave"], f"{path}.pic_slave"),
            ioapic=decode(abi.KvmIoapicState, data["ioapic"], f"{path}.ioapic"),
            pit=decode(abi.KvmPitState2, data["pit"], f"{path}.pit"),
            clock_ns=_int(data["clock_ns"], f"{path}.clock_ns", 0, (1 << 64) - 1),
        )


def xsave_size(vm: VmFd) -> int:
    """Bytes of a vCPU's XSAVE area on this VM (at least the 4 KiB of struct kvm_xsave)."""
    try:
        return max(vm.check_extension(abi.KVM_CAP_XSAVE2), 4096)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return 4096
        raise


def _copy(struct: ctypes.Structure) -> Any:
    return type(struct).from_buffer_copy(struct)


def _require_object(data: Any, path: str, keys: list[str]) -> None:
    if not isinstance(data, dict):
        raise StateError(f"{path}: expected an object")
    for key in keys:
        if key not in data:
            raise StateError(f"{path}.{key}: missing")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise StateError(f"{path}.{unknown[0]}: unknown field")


def _int(value: Any, path: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise StateError(f"{path}: expected an integer in {low}..{high}")
    return value
