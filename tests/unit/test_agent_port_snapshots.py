"""Snapshots and the agent's virtio-console port: a snapshot says whether it has the port
(the last device slot); one made before the port existed restores without it, over the UART,
and a machine that differs is refused with one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmctl.arch import memory_map
from vmctl.kvm.state_json import StateError
from vmctl.snapshot.snapshot_file import SnapshotError, SnapshotFile
from vmctl.vmm.agent import AGENT_CONSOLE_ENV, UART, VIRTIO_CONSOLE
from vmctl.vmm.daemon import _agent_console
from vmctl.vmm.machine import Machine, MachineConfig
from vmctl.vmm.save_restore import _agent_state, _parse

MEMORY = 128 << 20


def saved_state(**fields) -> dict:
    regions, offset = [], 0
    for guest, size in sorted(memory_map.ram_layout(MEMORY)):
        regions.append([guest, size, offset])
        offset += size
    return {"machine": {"memory": MEMORY, "cpus": 1, "regions": regions}, "memory_file": {"size": offset},
            "devices": [], **fields}


def parse(state: dict, agent_console: bool) -> dict:
    config = MachineConfig(kernel=Path("/nonexistent"), memory=MEMORY, agent=True, agent_console=agent_console)
    snapshot = SnapshotFile(Path("/snap"), state)
    return _parse(snapshot, Machine(config, restore_from=snapshot))


def test_a_snapshot_from_before_the_port_is_restored_without_it(monkeypatch):
    monkeypatch.delenv(AGENT_CONSOLE_ENV, raising=False)
    assert _agent_console(None) is True  # a new machine gets the port
    assert _agent_console(SnapshotFile(Path("/snap"), saved_state())) is False  # the old snapshot: UART
    assert _agent_console(SnapshotFile(Path("/snap"), saved_state(agent_console=True))) is True
    monkeypatch.setenv(AGENT_CONSOLE_ENV, "0")
    assert _agent_console(None) is False
    assert _agent_state({"ready": True, "next_id": 7}).transport == UART  # its saved agent had no transport field


@pytest.mark.parametrize("saved, machine, word", [(None, True, "without"), (True, False, "with")])
def test_a_machine_that_differs_from_the_snapshot_is_refused(saved, machine, word):
    state = saved_state() if saved is None else saved_state(agent_console=saved)
    with pytest.raises(SnapshotError, match=rf"^/snap/\S+: agent_console: the guest was saved {word} the agent's "
                                            "virtio-console port, this machine differs$"):
        parse(state, machine)


def test_the_port_counts_as_a_device_slot():
    with pytest.raises(SnapshotError, match=r"saved with 0 virtio device\(s\) \(none\), this machine has 1$"):
        parse(saved_state(agent_console=True), True)


def test_an_unknown_saved_transport_is_refused():
    with pytest.raises(StateError, match="agent.transport: unknown transport 'vsock'"):
        _agent_state({"ready": True, "next_id": 1, "transport": "vsock"})
    assert _agent_state({"ready": False, "next_id": 1, "transport": VIRTIO_CONSOLE}).transport == VIRTIO_CONSOLE
