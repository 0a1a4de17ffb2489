"""Snapshots of a running native VM: a counting guest saved, then restored as two clones."""

from __future__ import annotations

import io
import os
import struct
import threading
import time

import pytest

from vmctl.snapshot.snapshot_file import MEMORY_FILE, SnapshotError, read_snapshot
from vmctl.vmm.machine import Machine, MachineConfig
from vmctl.vmm.vcpu_thread import install_kick_handler

COUNTER = 0x6F00  # counter.S keeps its count here
LIMIT = 60
MEMORY = 64 << 20


class Console(io.BytesIO):
    def text(self) -> str:
        return self.getvalue().decode()


def _config(kernel, console) -> MachineConfig:
    return MachineConfig(kernel=kernel, memory=MEMORY, console_sinks=[console], timeout=300)


def _start(machine: Machine) -> tuple[threading.Thread, list]:
    outcomes: list = []
    thread = threading.Thread(target=lambda: outcomes.append(machine.run()))
    thread.start()
    return thread, outcomes


def _wait_for_lines(console: Console, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while console.text().count("\n") < count:
        assert time.monotonic() < deadline, f"the guest printed only {console.text()!r}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def counting_snapshot(assemble, tmp_path_factory):
    """A counting guest snapshotted after it printed 10 lines, then stopped: (path, source output)."""
    install_kick_handler()  # machines run in threads here: the kick signal must not kill us
    kernel = assemble("counter.S", LIMIT=LIMIT)
    console = Console()
    machine = Machine(_config(kernel, console))
    thread, outcomes = _start(machine)
    _wait_for_lines(console, 10)
    summary = machine.snapshot(tmp_path_factory.mktemp("snap") / "counting", then="stop")
    thread.join(30)
    assert outcomes and "stopped after snapshot" in outcomes[0].reason, outcomes
    return kernel, summary, console.text()


def test_both_clones_continue_from_the_saved_count(counting_snapshot):
    kernel, summary, before = counting_snapshot
    snapshot = read_snapshot(summary["path"])
    saved_count = struct.unpack_from("<Q", (snapshot.path / MEMORY_FILE).read_bytes(), COUNTER)[0]
    # The source stopped at the count it saved: its last line is that count (or part of it).
    assert 10 <= saved_count < LIMIT
    assert before.rsplit("\n", 1)[0].splitlines()[-1] in (str(saved_count), str(saved_count - 1))

    consoles = [Console(), Console()]
    clones = [Machine(_config(kernel, console), restore_from=read_snapshot(summary["path"])) for console in consoles]
    runs = [_start(clone) for clone in clones]  # both at once, sharing the memory file
    for thread, _ in runs:
        thread.join(300)
    expected = "".join(f"{i}\n" for i in range(1, LIMIT + 1))
    for (_, outcomes), console in zip(runs, consoles):
        assert outcomes[0].exit_code == LIMIT, (outcomes[0], console.text())
        assert before + console.text() == expected  # no count lost, repeated or skipped


def test_guest_memory_is_mapped_from_the_snapshot_copy_on_write(counting_snapshot):
    kernel, summary, _ = counting_snapshot
    snapshot = read_snapshot(summary["path"])
    original = (snapshot.path / MEMORY_FILE).read_bytes()
    clone = Machine(_config(kernel, Console()), restore_from=snapshot)
    assert clone.run().exit_code == LIMIT
    # The clone wrote its counter, but only into its private copy: the file is unchanged.
    assert (snapshot.path / MEMORY_FILE).read_bytes() == original
    assert summary["memory_bytes"] < MEMORY // 4  # untouched RAM is not in the file (holes)


def test_restore_with_other_memory_size_is_refused(counting_snapshot):
    kernel, summary, _ = counting_snapshot
    config = _config(kernel, Console())
    config.memory = 32 << 20
    with pytest.raises(SnapshotError, match="saved with 64 MiB of memory, this machine has 32 MiB"):
        Machine(config, restore_from=read_snapshot(summary["path"])).run()


def _copy_with_state(summary, tmp_path, change):
    """A copy of the snapshot whose JSON `change` edited (re-checksummed, memory hard-linked)."""
    from vmctl.snapshot import snapshot_file as fmt

    source = read_snapshot(summary["path"])
    state = source.state
    change(state)
    copy = tmp_path / "edited"
    copy.mkdir()
    os.link(source.memory_path, copy / MEMORY_FILE)
    fmt.write_state(copy, state)
    return copy


def test_snapshot_needing_cpu_features_this_host_lacks_is_refused(counting_snapshot, tmp_path):
    kernel, summary, _ = counting_snapshot
    leaf7 = next(e for e in read_snapshot(summary["path"]).state["vcpus"][0]["cpuid"] if e["function"] == 7 and e["index"] == 0)
    bit = next(b for b in range(32) if not leaf7["edx"] & (1 << b) and b not in (4,))

    def add_feature(state):
        for vcpu in state["vcpus"]:
            for entry in vcpu["cpuid"]:
                if entry["function"] == 7 and entry["index"] == 0:
                    entry["edx"] |= 1 << bit

    copy = _copy_with_state(summary, tmp_path, add_feature)
    with pytest.raises(SnapshotError, match="saved on a CPU with features this host cannot offer: "):
        Machine(_config(kernel, Console()), restore_from=read_snapshot(copy)).run()


def test_snapshot_with_other_device_list_is_refused(counting_snapshot, tmp_path):
    from vmctl.virtio.factories import rng

    kernel, summary, _ = counting_snapshot
    config = _config(kernel, Console())
    config.devices = [rng()]
    with pytest.raises(SnapshotError, match=r"saved with 0 virtio device\(s\) \(none\), this machine has 1"):
        Machine(config, restore_from=read_snapshot(summary["path"])).run()


def test_a_machine_with_pmem_restores_with_its_region_at_the_same_address(assemble, tmp_path):
    from vmctl.virtio.factories import pmem

    install_kick_handler()
    base = tmp_path / "base.raw"
    base.write_bytes(b"base" * 1024)
    kernel = assemble("counter.S", LIMIT=30)
    console = Console()
    config = _config(kernel, console)
    config.devices = [pmem(base)]
    machine = Machine(config)
    thread, _ = _start(machine)
    _wait_for_lines(console, 5)
    start = machine.mmio_devices[0].device.start
    summary = machine.snapshot(tmp_path / "snap", then="stop")
    thread.join(30)
    clone_config = _config(kernel, Console())
    clone_config.devices = [pmem(base)]
    clone = Machine(clone_config, restore_from=read_snapshot(summary["path"]))
    assert clone.run().exit_code == 30
    assert clone_config.devices[0].attached.device.start == start == 1 << 32
