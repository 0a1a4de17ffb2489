"""Tiny guests on /dev/kvm: console output, exit status, SMP bring-up, unowned addresses."""

from __future__ import annotations

import io
import logging

import pytest

from vmctl.vmm.machine import Machine, MachineConfig


def boot(kernel, cpus: int = 1, timeout: float = 60) -> tuple[Machine, object, str]:
    console = io.BytesIO()
    machine = Machine(MachineConfig(kernel=kernel, cpus=cpus, memory=64 << 20, console_sinks=[console], timeout=timeout))
    outcome = machine.run()
    return machine, outcome, console.getvalue().decode()


def test_guest_prints_over_the_uart(assemble):
    _, outcome, console = boot(assemble("hello.S"))
    assert console == "hello from the guest\n"
    assert outcome.exit_code == 0 and not outcome.crashed


@pytest.mark.parametrize("status", [0, 3, 42, 255])
def test_guest_exit_status_through_exit_port(assemble, status):
    _, outcome, _ = boot(assemble("hello.S", STATUS=status))
    assert outcome.exit_code == status
    assert "exit port" in outcome.reason


def test_cli_boot_streams_console_and_returns_status(assemble, vmctl_cli):
    result = vmctl_cli("boot", "--kernel", str(assemble("hello.S", STATUS=7)), "--timeout", "60")
    assert result.stdout == "hello from the guest\n"
    assert result.returncode == 7, result.stderr
    assert "status 7" in result.stderr


@pytest.mark.parametrize("cpus", [2, 3])
def test_code_runs_on_every_vcpu(assemble, cpus):
    _, outcome, console = boot(assemble("smp.S", NCPUS=cpus), cpus=cpus)
    assert outcome.exit_code == cpus, console
    # Each vCPU reports the APIC id that vmctl put in its CPUID.
    assert sorted(console.splitlines()) == [f"cpu {i} up" for i in range(cpus)]


def test_unowned_pio_and_mmio_read_as_ones_and_are_reported_once(assemble, caplog):
    caplog.set_level(logging.INFO, logger="vmctl.devices.bus")
    machine, outcome, _ = boot(assemble("unowned.S"))
    assert outcome.exit_code == 0, "a read from an unowned address did not return all ones"
    assert machine.pio.unhandled == {("read", 0x2F8): 5, ("write", 0x1234): 5}
    assert machine.mmio.unhandled == {("read", 0xD0100000): 5, ("write", 0xD0100000): 5}
    reports = [r.getMessage() for r in caplog.records if "no device there" in r.getMessage()]
    assert len(reports) == 4, reports


def test_timeout_stops_a_guest_that_never_exits(assemble):
    machine, outcome, _ = boot(assemble("forever.S"), cpus=2, timeout=1.0)
    assert outcome.exit_code == 124 and "timed out" in outcome.reason
    assert all(not thread.is_alive() for thread in machine.threads)


def test_triple_fault_is_one_clear_error_with_registers_in_the_debug_log(assemble, vmctl_cli):
    result = vmctl_cli("-vv", "boot", "--kernel", str(assemble("crash.S")), "--timeout", "60")
    assert result.returncode == 125
    errors = [line for line in result.stderr.splitlines() if line.startswith("vmctl: error:")]
    assert errors == ["vmctl: error: guest triple fault (KVM_EXIT_SHUTDOWN) on vCPU 0 at rip=0x100007 (registers: run with -vv)"]
    assert "rip=0x0000000000100007" in result.stderr and "cr3=0x9000" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory", "8M"], "memory: 8 MiB is below the minimum of 16 MiB"),
        (["--cpus", "0"], "cpus: 0 is out of range 1..32"),
        (["--cmdline", "x" * 70000], "kernel command line is 70000 bytes"),
        (["--initrd", "/nonexistent"], "initrd: /nonexistent: no such file"),
    ],
)
def test_bad_boot_arguments_are_one_line_errors(assemble, vmctl_cli, args, message):
    result = vmctl_cli("boot", "--kernel", str(assemble("hello.S")), *args)
    assert result.returncode == 1
    assert result.stderr.startswith("vmctl: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
