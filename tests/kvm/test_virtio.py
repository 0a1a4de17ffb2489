"""Tiny guest drivers talk to vmctl's virtio devices on the host's /dev/kvm."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vmctl.net import host as hostnet
from vmctl.virtio import factories
from vmctl.vmm.machine import Machine, MachineConfig


def run(kernel, devices, timeout: float = 120):
    console = io.BytesIO()
    config = MachineConfig(kernel=kernel, memory=64 << 20, console_sinks=[console], timeout=timeout, devices=devices)
    return Machine(config).run()


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.raw"
    sector0 = b"VMCTLDSK" + bytes(range(256)) + bytes(248)
    path.write_bytes(sector0 + bytes(1 << 20))
    return path


def test_guest_reads_sector_0_and_writes_sector_1(assemble, disk):
    device = factories.block(disk)
    outcome = run(assemble("virtio_blk.S"), [device])
    assert outcome.exit_code == 0, outcome.reason
    sector1 = disk.read_bytes()[512:1024]
    assert sector1[:8] == b"GUESTWRT" and sector1[8:264] == bytes(range(256))
    # Both kicks reached the worker through the ioeventfd, not through an MMIO exit.
    assert device.attached.transport.trapped_notifies == 0


def test_read_only_disk_fails_the_guest_write(assemble, disk):
    before = disk.read_bytes()
    outcome = run(assemble("virtio_blk.S", WRITE_STATUS=1), [factories.block(disk, read_only=True)])
    assert outcome.exit_code == 0, outcome.reason
    assert disk.read_bytes() == before


def test_guest_draws_bytes_from_virtio_rng(assemble):
    outcome = run(assemble("virtio_rng.S"), [factories.rng()])
    assert outcome.exit_code == 0, outcome.reason


def test_cli_boot_with_disk_and_rng(assemble, vmctl_cli, disk):
    # The disk is in slot 0 (the guest drives slot 0), the rng in slot 1.
    result = vmctl_cli("boot", "--kernel", str(assemble("virtio_blk.S")), "--disk", str(disk), "--rng",
                       "--timeout", "120")
    assert result.returncode == 0, result.stderr
    assert disk.read_bytes()[512:520] == b"GUESTWRT"


def test_looping_chain_needs_reset_and_the_device_recovers(assemble, caplog):
    caplog.set_level("WARNING", logger="vmctl.virtio.mmio")
    outcome = run(assemble("virtio_bad_chain.S"), [factories.rng()])
    assert outcome.exit_code == 0, outcome.reason
    warnings = [r.getMessage() for r in caplog.records if "needs reset" in r.getMessage()]
    assert len(warnings) == 1 and "loops" in warnings[0]


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun")
@pytest.mark.parametrize("mode", ["isolated", "nat"])
def test_killed_vmm_leaves_no_tap_or_nat_rule_behind(assemble, mode):
    if mode == "nat" and shutil.which("iptables") is None:
        pytest.skip("needs iptables")
    before = set(os.listdir("/sys/class/net"))
    exe = shutil.which("vmctl", path=os.path.dirname(sys.executable))
    process = subprocess.Popen([exe, "boot", "--kernel", str(assemble("forever.S")), "--net", mode, "--quiet",
                                "--no-input", "--timeout", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # until the TAP shows up (bounded; nothing is timed)
            new = set(os.listdir("/sys/class/net")) - before
            if new or process.poll() is not None:
                break
            time.sleep(0.05)
        assert new and all(name.startswith("vmctl") for name in new), "no TAP appeared"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not set(os.listdir("/sys/class/net")) - before  # the TAP went with the process
    if mode == "nat":
        hostnet.sweep_stale_rules()  # what the next VM's network setup does first
        rules = subprocess.run(["iptables", "-t", "nat", "-S", "POSTROUTING"], capture_output=True, text=True).stdout
        assert not any(f"vmctl:{name}" in rules for name in new)


def test_guest_reads_a_pmem_region_and_cannot_write_it(assemble, tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"pmem says hello\n" + bytes(range(256)) * 16)  # 4 KiB + 16: not 2 MiB-sized
    before = base.read_bytes()
    device = factories.pmem(base)
    console = io.BytesIO()
    config = MachineConfig(kernel=assemble("virtio_pmem.S"), memory=64 << 20, console_sinks=[console],
                           timeout=120, devices=[device])
    machine = Machine(config)
    outcome = machine.run()
    assert console.getvalue() == b"pmem says hello\np\n"
    assert outcome.exit_code == 0, outcome.reason  # the region's tail past the file reads 0
    assert base.read_bytes() == before
    start = 1 << 32  # above 64 MiB of RAM and the 32-bit MMIO gap
    assert machine.mmio.unhandled == {("write", start): 1}


def test_cli_boot_with_pmem(assemble, vmctl_cli, tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"pmem from the CLI")
    result = vmctl_cli("boot", "--kernel", str(assemble("virtio_pmem.S")), "--pmem", str(base), "--timeout", "120")
    assert result.stdout == "pmem from the CLp\n" and result.returncode == 0, result.stderr
    missing = vmctl_cli("boot", "--kernel", str(assemble("virtio_pmem.S")), "--pmem", str(tmp_path / "nope"))
    assert missing.returncode != 0 and f"--pmem {tmp_path / 'nope'}: no such file" in missing.stderr
