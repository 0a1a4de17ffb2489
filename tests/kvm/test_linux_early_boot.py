"""Early Linux boot on the host's /dev/kvm: vmctl and QEMU print the same boot facts.

This host's KVM may emulate guest kernel code (kvm_pvm), so Linux stops early there, on an
instruction the emulator lacks; but by then it has printed what the boot protocol told it.
Both VMMs boot the same ELF vmlinux (no decompressor: it is far too slow under emulation)
with the same initramfs and command line, and the facts must agree.
"""

from __future__ import annotations

import io
import re
import shutil

import pytest

from vmctl.peers.qemu import qemu_command, run_qemu
from vmctl.vmm.machine import Machine, MachineConfig

CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1 vmctl.test=early-boot"
STOP_AFTER = re.compile(r"Kernel command line: .*\n")
E820 = re.compile(r"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (\w+)")
RAMDISK = re.compile(r"RAMDISK: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\]")
PROCESSORS = re.compile(r"Processors: (\d+)")


def boot_facts(console: str) -> dict:
    usable = [(int(a, 16), int(b, 16) + 1) for a, b, kind in E820.findall(console) if kind == "usable"]
    ramdisk = RAMDISK.search(console)
    processors = PROCESSORS.search(console)
    command_line = re.search(r"^.*\] Command line: (.*)$", console, re.M)
    return {
        "command_line": command_line.group(1).strip() if command_line else None,
        "usable": usable,
        "usable_bytes": sum(end - start for start, end in usable),
        "ramdisk_bytes": int(ramdisk.group(2), 16) + 1 - int(ramdisk.group(1), 16) if ramdisk else None,
        "processors": int(processors.group(1)) if processors else None,
        "mp_table_found": "found SMP MP-table at" in console,
    }


def vmctl_console(kernel, initrd, cpus: int) -> str:
    console = io.BytesIO()
    machine = Machine(MachineConfig(kernel=kernel, initrd=initrd, cmdline=CMDLINE, cpus=cpus, memory=256 << 20,
                                    console_sinks=[console], timeout=120))
    outcome = machine.run()
    text = console.getvalue().decode(errors="replace")
    # Either it stopped on an instruction the host's emulator lacks, or it booted on.
    assert outcome.exit_code in (0, 124, 125), outcome
    return text


@pytest.fixture(scope="module")
def reference_initramfs(tmp_path_factory):
    """Any bytes do: Linux only reserves the RAMDISK range this early, it unpacks it later."""
    path = tmp_path_factory.mktemp("initrd") / "initrd.bin"
    path.write_bytes(bytes(range(256)) * 4100)  # just over 1 MiB: not page aligned on purpose
    return path


@pytest.fixture(scope="module")
def qemu_facts(reference_kernel, reference_initramfs, tmp_path_factory) -> dict:
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")
    console_path = tmp_path_factory.mktemp("qemu") / "console.log"
    # -cpu EPYC: `-cpu host` asks for MSRs this host's KVM refuses.
    command = qemu_command(reference_kernel.vmlinux, reference_initramfs, CMDLINE, 1, 256, console_path=console_path)
    command[command.index("host")] = "EPYC"
    run = run_qemu(command, console_path, timeout=180, until=STOP_AFTER)
    facts = boot_facts(run.console)
    if facts["command_line"] is None:
        pytest.fail(f"QEMU printed no early boot log in {run.seconds:.0f} s:\n{run.console[-2000:]}")
    return facts


def test_same_early_boot_facts_as_qemu(reference_kernel, reference_initramfs, qemu_facts):
    ours = boot_facts(vmctl_console(reference_kernel.vmlinux, reference_initramfs, cpus=1))
    assert ours["command_line"] == qemu_facts["command_line"] == CMDLINE
    assert ours["mp_table_found"] and qemu_facts["mp_table_found"]
    assert ours["processors"] == qemu_facts["processors"] == 1
    assert ours["ramdisk_bytes"] == qemu_facts["ramdisk_bytes"] == -(-reference_initramfs.stat().st_size // 4096) * 4096
    # Both give the guest its RAM below 640 KiB and from 1 MiB up; QEMU's firmware keeps a
    # little more of the top for itself (ACPI tables), so totals agree within 1%.
    for facts in (ours, qemu_facts):
        assert facts["usable"][0][0] == 0 and any(start == 0x100000 for start, _ in facts["usable"])
    assert abs(ours["usable_bytes"] - qemu_facts["usable_bytes"]) <= 0.01 * qemu_facts["usable_bytes"]


def test_two_vcpus_are_described_by_the_mp_table(reference_kernel, reference_initramfs):
    console = vmctl_console(reference_kernel.vmlinux, reference_initramfs, cpus=2)
    assert boot_facts(console)["processors"] == 2
    assert "Processor #1" in console and "smpboot: Allowing 2 CPUs" in console
