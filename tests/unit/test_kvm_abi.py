"""Our ctypes KVM structs and ioctl numbers against the kernel headers, via a compiled C program."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from vmctl.kvm import abi

HEADER = Path("/usr/include/linux/kvm.h")

# (python path, C expression) pairs for fields inside kvm_run's anonymous exit union.
KVM_RUN_FIELDS = {
    "exit_reason": "exit_reason",
    "immediate_exit": "immediate_exit",
    "apic_base": "apic_base",
    "exit.io.port": "io.port",
    "exit.io.data_offset": "io.data_offset",
    "exit.mmio.phys_addr": "mmio.phys_addr",
    "exit.mmio.data": "mmio.data",
    "exit.mmio.len": "mmio.len",
    "exit.mmio.is_write": "mmio.is_write",
    "exit.internal.suberror": "internal.suberror",
    "exit.internal.data": "internal.data",
    "exit.system_event.type": "system_event.type",
    "exit.fail_entry.hardware_entry_failure_reason": "fail_entry.hardware_entry_failure_reason",
    "kvm_valid_regs": "kvm_valid_regs",
}
# Fields inside the nested structs of the state structs snapshots save: (struct, dotted, C type).
NESTED_FIELDS = {
    "KvmVcpuEvents.exception.error_code": (abi.KvmVcpuEvents, "exception.error_code", "struct kvm_vcpu_events"),
    "KvmVcpuEvents.interrupt.shadow": (abi.KvmVcpuEvents, "interrupt.shadow", "struct kvm_vcpu_events"),
    "KvmVcpuEvents.nmi.masked": (abi.KvmVcpuEvents, "nmi.masked", "struct kvm_vcpu_events"),
    "KvmVcpuEvents.smi.latched_init": (abi.KvmVcpuEvents, "smi.latched_init", "struct kvm_vcpu_events"),
    "KvmIrqchip.chip.ioapic.redirtbl": (abi.KvmIrqchip, "chip.ioapic.redirtbl", "struct kvm_irqchip"),
    "KvmIrqchip.chip.pic.elcr_mask": (abi.KvmIrqchip, "chip.pic.elcr_mask", "struct kvm_irqchip"),
    "KvmXcrs.xcrs": (abi.KvmXcrs, "xcrs", "struct kvm_xcrs"),
}
# Every ioctl number abi defines: values whose type byte (bits 8..15) is KVMIO.
IOCTLS = [
    name for name, value in vars(abi).items()
    if name.startswith("KVM_") and isinstance(value, int) and value > 0xFF and (value >> 8) & 0xFF == abi.KVMIO
]


def _python_offset(struct: type, dotted: str) -> int:
    offset, current = 0, struct
    for part in dotted.split("."):
        descriptor = getattr(current, part)
        offset += descriptor.offset
        current = dict(current._fields_)[part]
    return offset


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    if not shutil.which("gcc") or not HEADER.exists():
        pytest.skip("gcc and linux-libc-dev (/usr/include/linux/kvm.h) are needed to compare layouts")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name, (struct, c_name) in abi.CHECKED_STRUCTS.items():
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof({c_name}));')
        for field, *_ in struct._fields_:
            if name == "KvmRun" and field == "exit":
                continue
            lines.append(f'printf("offset {name}.{field} %zu\\n", offsetof({c_name}, {field}));')
    for dotted, c_field in KVM_RUN_FIELDS.items():
        lines.append(f'printf("run {dotted} %zu\\n", offsetof(struct kvm_run, {c_field}));')
    for key, (_, dotted, c_name) in NESTED_FIELDS.items():
        lines.append(f'printf("nested {key} %zu\\n", offsetof({c_name}, {dotted}));')
    lines.append('printf("sizeof ioapic_redirtbl %zu\\n", sizeof(((struct kvm_ioapic_state *)0)->redirtbl[0]));')
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long){name});')
    lines.append("return 0; }")
    folder = tmp_path_factory.mktemp("abi")
    (folder / "layout.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(folder / "layout"), str(folder / "layout.c")], check=True)
    output = subprocess.run([str(folder / "layout")], check=True, capture_output=True, text=True).stdout
    return {f"{kind} {key}": int(value) for kind, key, value in (line.split() for line in output.splitlines())}


@pytest.mark.parametrize("name", sorted(abi.CHECKED_STRUCTS))
def test_struct_layout_matches_kernel(c_layout, name):
    struct, _ = abi.CHECKED_STRUCTS[name]
    for field, *_ in struct._fields_:
        if name == "KvmRun" and field == "exit":
            continue
        assert getattr(struct, field).offset == c_layout[f"offset {name}.{field}"], f"{name}.{field}"
    if name != "KvmRun":  # the C struct continues with the 2 KiB sync-regs union we do not map
        assert ctypes.sizeof(struct) == c_layout[f"sizeof {name}"], name
    else:
        assert abi.KvmRun.exit.offset == 32


@pytest.mark.parametrize("dotted", sorted(KVM_RUN_FIELDS))
def test_kvm_run_exit_union_offsets(c_layout, dotted):
    assert _python_offset(abi.KvmRun, dotted) == c_layout[f"run {dotted}"]


@pytest.mark.parametrize("key", sorted(NESTED_FIELDS))
def test_nested_state_fields_match_kernel(c_layout, key):
    struct, dotted, _ = NESTED_FIELDS[key]
    assert _python_offset(struct, dotted) == c_layout[f"nested {key}"], key


def test_ioapic_redirection_entries_are_64_bit(c_layout):
    assert c_layout["sizeof ioapic_redirtbl"] == 8


@pytest.mark.parametrize("name", sorted(IOCTLS))
def test_ioctl_numbers_match_kernel(c_layout, name):
    assert getattr(abi, name) == c_layout[f"ioctl {name}"], name


def test_flexible_arrays_have_header_layout():
    assert ctypes.sizeof(abi.kvm_cpuid2(3)) == 8 + 3 * ctypes.sizeof(abi.KvmCpuidEntry2)
    assert ctypes.sizeof(abi.kvm_msrs(2)) == 8 + 2 * 16
    assert ctypes.sizeof(abi.kvm_irq_routing(4)) == 8 + 4 * ctypes.sizeof(abi.KvmIrqRoutingEntry)
    assert ctypes.sizeof(abi.kvm_msr_list(5)) == 4 + 5 * 4
    assert ctypes.sizeof(abi.kvm_xsave2(8192)) == 8192 and ctypes.sizeof(abi.kvm_xsave2(100)) == 4096
