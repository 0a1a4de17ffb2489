"""Saving a running `Machine` into a snapshot directory, and building a machine from one.

Saving: every vCPU parks outside KVM_RUN (vcpu_thread.py), every virtio transport's lock is
taken (no queue work in flight; vhost rings are taken back from the kernel), then KVM's state
(vCPUs, irqchip, PIT, kvmclock), the devices' state and guest RAM are written, and the machine
resumes or stops. Restoring: the same VM is built again (irqchip, PIT, devices from the
machine's own config, slot by slot) but guest RAM is the snapshot's memory file mapped
copy-on-write, and every piece of state is put back before any vCPU runs.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .. import __version__
from ..arch import memory_map
from ..arch.cpuid import cpuid_for_vcpu
from ..devices.serial import SerialState
from ..errors import VmctlError
from ..kvm.saved_state import VcpuState, VmState, msrs_to_save, xsave_size
from ..kvm.state_json import StateError
from ..kvm.system import Kvm
from ..kvm.vcpu import VcpuFd
from ..kvm.vm import VmFd
from ..memory import GuestMemory
from ..snapshot.cpu_check import missing_features
from ..snapshot.snapshot_file import MEMORY_FILE, STATE_FILE, MemoryWriter, SnapshotError, SnapshotFile, discard, write_state
from ..state_codec import StateFieldError, state_from_json, state_to_json
from ..units import format_size
from ..virtio.mmio import TransportState, TransportStateError
from .agent import TRANSPORTS, UART, AgentState
from .outcome import Outcome
from .vcpu_thread import VcpuThread

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)


def _transports(machine: "Machine") -> list:
    transports = []
    for index, device in enumerate(machine.mmio_devices):
        transport = getattr(device, "transport", None)
        if transport is None:
            raise VmctlError(f"MMIO slot {index} holds a device that cannot be snapshotted")
        transports.append(transport)
    return transports


def save_machine(machine: "Machine", path: Path, extra: dict[str, Any], then: str,
                 while_paused: Callable[[], None] | None = None, save_memory: bool = True) -> dict[str, Any]:
    """`path` is created (it must not exist, or be an empty directory); `while_paused` runs with
    the vCPUs parked and the devices quiesced, before anything is saved (the daemon switches
    the disks to new overlays there, so the saved guest and its disk layers match)."""
    if then not in ("resume", "stop"):
        raise ValueError(f"then={then!r}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SnapshotError(f"{path}: already exists")
    if not path.parent.is_dir():
        raise SnapshotError(f"{path.parent}: no such directory")
    transports = _transports(machine)
    started = time.monotonic()
    machine.pause()
    paused = time.monotonic()
    created = not path.exists()
    try:
        with ExitStack() as locks:
            for transport in transports:
                locks.enter_context(transport.lock)
            try:
                for transport in transports:
                    transport.quiesce()
                path.mkdir(exist_ok=True)
                if while_paused is not None:
                    while_paused()
                summary: dict[str, Any] = _write(machine, transports, path, extra) if save_memory else {"path": str(path)}
            finally:
                for transport in transports:
                    transport.resume()
    except BaseException:
        if created:
            discard(path)
        else:
            for child in (path / MEMORY_FILE, path / f"{STATE_FILE}.tmp"):
                child.unlink(missing_ok=True)
        machine.resume()
        raise
    saved = time.monotonic()
    if then == "stop":
        machine.stop(Outcome(0, f"stopped after snapshot {path}"))
        machine.resume()  # the parked vCPUs see the stop and end
    else:
        machine.resume()
    summary.update(pause_seconds=saved - paused, total_seconds=time.monotonic() - started)
    log.info("snapshot %s: %s of memory file, vCPUs paused %.3f s", path, format_size(summary.get("memory_bytes", 0)),
             summary["pause_seconds"])
    return summary


def _write(machine: "Machine", transports: list, folder: Path, extra: dict[str, Any]) -> dict[str, Any]:
    vm, kvm = machine.vm, machine.kvm
    area = xsave_size(vm)
    msrs = msrs_to_save(kvm.msr_index_list())
    state: dict[str, Any] = {
        "vmctl_version": __version__,
        "created": time.time(),
        "xsave_size": area,
        "vcpus": [VcpuState.save(vcpu, msrs, area).to_json() for vcpu in machine.vcpus],
        "vm": VmState.save(vm).to_json(),
        "serial": state_to_json(machine.serial.save_state()),
        "agent_serial": state_to_json(machine.agent_serial.save_state()) if machine.agent_serial else None,
        "agent": state_to_json(machine.agent.save_state()) if machine.agent else None,
        "agent_console": machine.config.has_agent_port,  # the last device slot is the agent's port
        "devices": [state_to_json(transport.save_state()) for transport in transports],
        "extra": extra,
    }
    writer = MemoryWriter(folder / MEMORY_FILE)
    regions = [[region.guest_address, region.size, writer.write_region(region.host_address, region.view)]
               for region in machine.memory.regions]
    size, digest = writer.finish()
    state["machine"] = {"cpus": len(machine.vcpus), "memory": machine.memory.size, "regions": regions}
    state["memory_file"] = {"size": size, "sha256": digest}
    write_state(folder, state)
    allocated = (folder / MEMORY_FILE).stat().st_blocks * 512
    return {"path": str(folder), "memory_bytes": allocated, "memory_size": size}


# --- restore -------------------------------------------------------------------------------
def build_restored(machine: "Machine", snapshot: SnapshotFile) -> None:
    """`Machine._build` for a restore: raises SnapshotError (one line) for anything that does not fit."""
    state_path = snapshot.path / STATE_FILE
    began = time.monotonic()
    parsed = _parse(snapshot, machine)
    vcpus, vm_state, devices, serial = parsed["vcpus"], parsed["vm"], parsed["devices"], parsed["serial"]

    machine.kvm = Kvm()
    machine.vm = VmFd(machine.kvm)
    if snapshot.state.get("xsave_size", 4096) > xsave_size(machine.vm):
        raise SnapshotError(f"{state_path}: saved XSAVE area of {snapshot.state['xsave_size']} bytes is larger "
                            f"than this host's {xsave_size(machine.vm)}")
    machine.vm.set_tss_address(memory_map.KVM_TSS_ADDRESS)
    machine.vm.set_identity_map_address(memory_map.KVM_IDENTITY_MAP_ADDRESS)
    machine.vm.create_irqchip()
    machine.vm.create_pit()

    machine.memory = GuestMemory(parsed["layout"], "file", file=str(snapshot.memory_path))
    for region in machine.memory.regions:
        machine.vm.add_memory_slot(region.guest_address, region.size, region.host_address)

    machine._add_mmio_devices()  # their cmdline words are in the saved guest already
    machine._add_legacy_devices()
    for saved in vcpus:
        vcpu = VcpuFd(machine.vm, saved.index)
        machine.vcpus.append(vcpu)  # closed with the machine even if restoring it fails
        if saved.index == 0:
            _check_cpu(vcpu, machine.kvm, saved, len(vcpus), state_path)
        try:
            saved.restore(vcpu)
        except OSError as error:
            raise SnapshotError(f"{state_path}: vcpus[{saved.index}]: KVM refused the saved state: {error}") from None
        machine.threads.append(VcpuThread(vcpu, machine.pio, machine.mmio, machine.stop, machine._stopping))
    try:
        vm_state.restore(machine.vm)
    except OSError as error:
        raise SnapshotError(f"{state_path}: vm: KVM refused the saved irqchip/PIT/clock: {error}") from None
    for index, (slot, saved_device) in enumerate(zip(machine.mmio_devices, devices)):
        try:
            slot.transport.restore_state(saved_device)  # type: ignore[attr-defined]  # a VirtioMmioSlot
        except TransportStateError as error:
            raise SnapshotError(f"{state_path}: devices[{index}]: {error}") from None
    machine.serial.restore_state(serial)
    if machine.agent_serial is not None and parsed["agent_serial"] is not None:
        machine.agent_serial.restore_state(parsed["agent_serial"])
        try:
            machine.agent.restore_state(parsed["agent"])
        except VmctlError as error:
            raise SnapshotError(f"{state_path}: {error}") from None
    log.info("restored %s: %d vCPU(s), %s in %.1f ms", snapshot.path, len(vcpus), format_size(machine.memory.size),
             (time.monotonic() - began) * 1000)


def _check_cpu(vcpu: VcpuFd, kvm: Kvm, saved: VcpuState, cpus: int, state_path: Path) -> None:
    """Compare like with like: the CPUID a guest booted on this host would see (set the way
    boot sets it, then read back: a paravirtual KVM may show more than it reports as
    supported) with the CPUID the saved guest saw. The restore sets the saved one next."""
    vcpu.set_cpuid(cpuid_for_vcpu(kvm.supported_cpuid(), 0, cpus))
    missing = missing_features(saved.cpuid, vcpu.get_cpuid())
    if missing:
        raise SnapshotError(f"{state_path}: saved on a CPU with features this host cannot offer: {', '.join(missing)}")


def _parse(snapshot: SnapshotFile, machine: "Machine") -> dict[str, Any]:
    """Every part of the JSON decoded and checked against this machine before KVM is touched."""
    state, config = snapshot.state, machine.config
    state_path = snapshot.path / STATE_FILE
    try:
        shape = state.get("machine")
        if not isinstance(shape, dict):
            raise StateError("machine: missing")
        saved_memory, saved_cpus = shape.get("memory"), shape.get("cpus")
        if config.memory != saved_memory:
            raise SnapshotError(f"{state_path}: the guest was saved with {format_size(int(saved_memory or 0))} of "
                                f"memory, this machine has {format_size(config.memory)} (a restore needs the same)")
        if config.cpus != saved_cpus:
            raise SnapshotError(f"{state_path}: the guest was saved with {saved_cpus} vCPU(s), this machine has "
                                f"{config.cpus}")
        saved_layout = _layout(shape.get("regions"), state["memory_file"]["size"])
        if saved_layout != sorted(memory_map.ram_layout(config.memory)):
            raise StateError("machine.regions: not the memory map of this vmctl for this memory size")
        raw_devices = state.get("devices")
        if not isinstance(raw_devices, list):
            raise StateError("devices: expected a list")
        # Before the agent had a virtio-console port a snapshot had no "agent_console": the
        # VMM restores such a guest without the port (its agent runs on ttyS1).
        saved_port = state.get("agent_console", False)
        if not isinstance(saved_port, bool):
            raise StateError("agent_console: expected true or false")
        if saved_port != config.has_agent_port:
            raise SnapshotError(f"{state_path}: agent_console: the guest was saved {'with' if saved_port else 'without'} "
                                "the agent's virtio-console port, this machine differs")
        if len(raw_devices) != config.slot_count:
            names = ", ".join(str(d.get("device_name")) for d in raw_devices if isinstance(d, dict))
            raise SnapshotError(f"{state_path}: the guest was saved with {len(raw_devices)} virtio device(s) "
                                f"({names or 'none'}), this machine has {config.slot_count}")
        raw_vcpus = state.get("vcpus")
        if not isinstance(raw_vcpus, list) or len(raw_vcpus) != saved_cpus:
            raise StateError(f"vcpus: expected {saved_cpus} saved vCPUs")
        vcpus = [VcpuState.from_json(data, f"vcpus[{i}]") for i, data in enumerate(raw_vcpus)]
        if [v.index for v in vcpus] != list(range(len(vcpus))):
            raise StateError("vcpus: indexes are not 0..n-1 in order")
        saved_agent = state.get("agent_serial") is not None
        if saved_agent != config.agent:
            raise SnapshotError(f"{state_path}: the guest was saved {'with' if saved_agent else 'without'} the "
                                "agent channel (COM2), this machine differs")
        return {
            "layout": [(guest, size) for guest, size in saved_layout],
            "vcpus": vcpus,
            "vm": VmState.from_json(state.get("vm")),
            "devices": [state_from_json(TransportState, data, f"devices[{i}]") for i, data in enumerate(raw_devices)],
            "serial": state_from_json(SerialState, state.get("serial"), "serial"),
            "agent_serial": state_from_json(SerialState, state["agent_serial"], "agent_serial") if saved_agent else None,
            "agent": _agent_state(state.get("agent")) if saved_agent else None,
        }
    except (StateError, StateFieldError) as error:
        raise SnapshotError(f"{state_path}: {error}") from None


def _agent_state(data: Any) -> AgentState:
    if isinstance(data, dict) and "transport" not in data:
        data = {**data, "transport": UART}  # saved before the agent had a virtio port
    state = state_from_json(AgentState, data, "agent")
    if state.transport not in TRANSPORTS:
        raise StateError(f"agent.transport: unknown transport {state.transport!r}")
    return state


def _layout(regions: Any, file_size: int) -> list[tuple[int, int]]:
    if not isinstance(regions, list) or not regions:
        raise StateError("machine.regions: expected a list of [guest address, size, file offset]")
    result, offset = [], 0
    for index, region in enumerate(regions):
        if not (isinstance(region, list) and len(region) == 3 and all(isinstance(v, int) and v >= 0 for v in region)):
            raise StateError(f"machine.regions[{index}]: expected [guest address, size, file offset]")
        guest, size, file_offset = region
        if file_offset != offset:
            raise StateError(f"machine.regions[{index}]: file offset {file_offset}, expected {offset}")
        result.append((guest, size))
        offset += size
    if offset != file_size:
        raise StateError(f"machine.regions: {offset} bytes of RAM, the memory file has {file_size}")
    return result
