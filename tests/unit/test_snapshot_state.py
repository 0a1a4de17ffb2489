"""Snapshot state (de)serialisation: vCPU and VM ABI structs, serial, virtqueues, transports."""

from __future__ import annotations

import ctypes
import json

import pytest

from vmctl.devices.serial import IER_RX_AVAILABLE, LCR, Serial, SerialState
from vmctl.kvm import abi
from vmctl.kvm.saved_state import VcpuState, VmState, msrs_to_save
from vmctl.kvm.state_json import StateError
from vmctl.memory import GuestMemory
from vmctl.snapshot.cpu_check import missing_features
from vmctl.state_codec import StateFieldError, state_from_json, state_to_json
from vmctl.virtio import mmio
from vmctl.virtio.driver import MmioDriver, QueueDriver
from vmctl.virtio.mmio import TransportState, TransportStateError, VirtioMmioTransport
from vmctl.virtio.rng import RngDevice
from vmctl.vmm.agent import UART, AgentChannel, AgentState


def _patterned(kind: type, seed: int) -> ctypes.Structure:
    """A struct whose every byte is set (so a field lost on the way shows up)."""
    size = ctypes.sizeof(kind)
    return kind.from_buffer_copy(bytes((seed + i * 7) & 0xFF for i in range(size)))


def _cpuid_entry(function: int, index: int = 0, **registers: int) -> abi.KvmCpuidEntry2:
    return abi.KvmCpuidEntry2(function=function, index=index, **registers)


def _vcpu_state(seed: int = 1) -> VcpuState:
    return VcpuState(
        index=0,
        cpuid=[_cpuid_entry(0, ebx=0x68747541, edx=0x69746E65, ecx=0x444D4163), _cpuid_entry(1, ecx=0x1234)],
        regs=_patterned(abi.KvmRegs, seed), sregs=_patterned(abi.KvmSregs, seed + 1),
        fpu=_patterned(abi.KvmFpu, seed + 2), xsave=_patterned(abi.KvmXsave, seed + 3),
        xcrs=_patterned(abi.KvmXcrs, seed + 4), debugregs=_patterned(abi.KvmDebugregs, seed + 5),
        msrs=[(0x10, 123456789), (0xC0000080, 0xD01), (0x6E0, (1 << 64) - 1)],
        lapic=_patterned(abi.KvmLapicState, seed + 6), events=_patterned(abi.KvmVcpuEvents, seed + 7),
        mp_state=abi.KVM_MP_STATE_HALTED, tsc_khz=2596140,
    )


def _same(a: ctypes.Structure, b: ctypes.Structure) -> bool:
    return type(a) is type(b) and bytes(a) == bytes(b)


def test_vcpu_state_round_trips_through_json_byte_for_byte():
    state = _vcpu_state()
    text = json.dumps(state.to_json())
    back = VcpuState.from_json(json.loads(text))
    for name in ("regs", "sregs", "fpu", "xsave", "xcrs", "debugregs", "lapic", "events"):
        assert _same(getattr(state, name), getattr(back, name)), name
    assert [bytes(e) for e in back.cpuid] == [bytes(e) for e in state.cpuid]
    assert (back.msrs, back.mp_state, back.tsc_khz) == (state.msrs, state.mp_state, state.tsc_khz)


def test_vcpu_state_json_is_readable_field_by_field():
    data = _vcpu_state().to_json()
    assert set(data["regs"]) == {name for name, _ in abi.KvmRegs._fields_}
    assert data["sregs"]["cs"]["selector"] == _vcpu_state().sregs.cs.selector
    assert data["events"]["exception"]["error_code"] == _vcpu_state().events.exception.error_code


def test_larger_xsave_areas_round_trip():
    state = _vcpu_state()
    state.xsave = _patterned(abi.kvm_xsave2(8192), 9)
    back = VcpuState.from_json(state.to_json())
    assert ctypes.sizeof(back.xsave) == 8192 and bytes(back.xsave) == bytes(state.xsave)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["regs"].pop("rip"), "vcpus[0].regs.rip: missing"),
    (lambda d: d["regs"].update(rip=1 << 64), "vcpus[0].regs.rip: 18446744073709551616 does not fit 64 bits"),
    (lambda d: d["sregs"]["cs"].update(selector="x"), "vcpus[0].sregs.cs.selector: expected an integer"),
    (lambda d: d["regs"].update(rpi=0), "vcpus[0].regs.rpi: unknown field"),
    (lambda d: d.update(lapic=d["lapic"][:-2]), "vcpus[0].lapic: 1023 bytes, expected 1024"),
    (lambda d: d.update(xsave="00" * 100), "vcpus[0].xsave: 100 bytes, expected at least 4096"),
    (lambda d: d.update(msrs=[[1, 2, 3]]), "vcpus[0].msrs: expected a list of"),
    (lambda d: d["fpu"].update(xmm=d["fpu"]["xmm"][:3]), "vcpus[0].fpu.xmm: expected a list of 16"),
    (lambda d: d.pop("events"), "vcpus[0].events: missing"),
])
def test_damaged_vcpu_state_names_the_field(mutate, message):
    data = _vcpu_state().to_json()
    mutate(data)
    with pytest.raises(StateError, match=message.replace("[", r"\[").replace("]", r"\]")):
        VcpuState.from_json(data)


def test_vm_state_round_trips():
    state = VmState(pic_master=_patterned(abi.KvmPicState, 1), pic_slave=_patterned(abi.KvmPicState, 2),
                    ioapic=_patterned(abi.KvmIoapicState, 3), pit=_patterned(abi.KvmPitState2, 4), clock_ns=987654321)
    back = VmState.from_json(json.loads(json.dumps(state.to_json())))
    for name in ("pic_master", "pic_slave", "ioapic", "pit"):
        assert _same(getattr(state, name), getattr(back, name)), name
    assert back.clock_ns == state.clock_ns
    # The PIT's count_load_time is signed (ktime): negative values survive.
    assert isinstance(state.to_json()["pit"]["channels"][0]["count_load_time"], int)


def test_msrs_are_restored_with_the_tsc_before_its_deadline_and_mtrrs_added():
    order = msrs_to_save([0x6E0, 0x10, 0x174])
    assert order.index(0x10) < order.index(0x6E0) == len(order) - 1
    assert 0x2FF in order and len(order) == len(set(order))


def test_serial_state_round_trips_and_restores_registers_and_fifo():
    serial = Serial(lambda data: None, lambda: None)
    serial.write(LCR, bytes([0x1B]))
    serial.write(1, bytes([IER_RX_AVAILABLE]))
    serial.feed(b"typed")
    saved = serial.save_state()
    decoded = state_from_json(SerialState, json.loads(json.dumps(state_to_json(saved))), "serial")
    assert decoded == saved
    fresh = Serial(lambda data: None, lambda: None)
    fresh.restore_state(decoded)
    assert fresh.read(LCR, 1)[0] == 0x1B and fresh.read(1, 1)[0] == IER_RX_AVAILABLE
    assert bytes(fresh.read(0, 1)[0] for _ in range(5)) == b"typed"


def test_agent_state_continues_request_ids():
    agent = AgentChannel()
    agent.link(UART, lambda data: None)(b"A ready\n")
    agent.post("true")
    saved = state_from_json(AgentState, state_to_json(agent.save_state()), "agent")
    clone = AgentChannel()
    clone.link(UART, lambda data: None)
    clone.restore_state(saved)
    assert clone.ready.is_set() and clone.save_state().next_id == 2


QUEUE_BASE = 0x40000


@pytest.fixture
def memory():
    mem = GuestMemory([(0, 4 << 20)])
    yield mem
    mem.close()


def _rng_transport(memory: GuestMemory) -> VirtioMmioTransport:
    return VirtioMmioTransport(RngDevice(), memory, lambda: None)


def test_transport_restores_driver_visible_queue_indices(memory):
    transport = _rng_transport(memory)
    driver = MmioDriver(transport)
    driver.negotiate()
    queue = QueueDriver(memory, QUEUE_BASE, 16)
    driver.setup_queue(0, queue)
    driver.driver_ok()
    for _ in range(3):
        queue.post([], [8])
    transport.process_queue(0)
    assert len(queue.take_used()) == 3
    with transport.lock:
        saved = transport.save_state()
    transport.close()
    text = json.dumps(state_to_json(saved))

    # A clone: the same guest memory, a new transport that never saw the driver.
    clone_memory = GuestMemory([(0, 4 << 20)])
    try:
        clone_memory.write(0, memory.read(0, 4 << 20))
        clone = _rng_transport(clone_memory)
        clone.restore_state(state_from_json(TransportState, json.loads(text), "devices[0]"))
        assert clone.read(mmio.STATUS, 4)[0] & mmio.DRIVER_OK
        assert (clone.queues[0].last_avail, clone.queues[0].next_used) == (3, 3)
        queue.memory = clone_memory  # the guest driver goes on, on the clone
        posted = queue.post([], [16])
        clone.process_queue(0)
        assert queue.take_used() == [(posted.head, 16)]
        assert clone_memory.read_u16(queue.used + 2) == 4  # used->idx continues from the saved 3
        clone.close()
    finally:
        clone_memory.close()


def test_transport_refuses_state_of_another_device_kind(memory):
    transport = _rng_transport(memory)
    saved = transport.save_state()
    saved.device_id, saved.device_name = 2, "blk"
    other = _rng_transport(memory)
    with pytest.raises(TransportStateError, match="saved device is virtio-blk .id 2., this slot has virtio-rng"):
        other.restore_state(saved)
    transport.close()
    other.close()


def test_transport_refuses_rings_outside_guest_ram(memory):
    transport = _rng_transport(memory)
    saved = transport.save_state()
    saved.queues[0].ready, saved.queues[0].desc_table = True, 1 << 40
    with pytest.raises(TransportStateError, match="queue 0: descriptor table .* is outside guest RAM"):
        transport.restore_state(saved)
    transport.close()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["queues"][0].update(last_avail="3"), r"devices\[0\].queues\[0\].last_avail: expected an integer"),
    (lambda d: d.pop("status"), r"devices\[0\].status: missing"),
    (lambda d: d.update(broken=1), r"devices\[0\].broken: expected true or false"),
    (lambda d: d.update(extra=1), r"devices\[0\].extra: unknown field"),
])
def test_damaged_transport_state_names_the_field(memory, mutate, message):
    transport = _rng_transport(memory)
    data = state_to_json(transport.save_state())
    transport.close()
    mutate(data)
    with pytest.raises(StateFieldError, match=message):
        state_from_json(TransportState, data, "devices[0]")


def test_cpu_check_names_missing_features_and_ignores_os_controlled_bits():
    vendor = _cpuid_entry(0, ebx=0x68747541, edx=0x69746E65, ecx=0x444D4163)
    saved = [vendor, _cpuid_entry(1, ecx=(1 << 28) | (1 << 27) | (1 << 31)), _cpuid_entry(7, ebx=1 << 16)]
    here = [vendor, _cpuid_entry(1, ecx=1 << 28), _cpuid_entry(7)]
    assert missing_features(saved, here) == ["avx512f"]
    assert missing_features(saved[:2], here) == []
    intel = _cpuid_entry(0, ebx=0x756E6547, edx=0x49656E69, ecx=0x6C65746E)
    assert missing_features(saved[:1], [intel]) == ["vendor AuthenticAMD (this host: GenuineIntel)"]
