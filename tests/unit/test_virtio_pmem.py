"""virtio-pmem: the region over a real file, config space, the flush queue and hostile
requests (an in-test driver writes descriptors into guest memory)."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from vmctl.arch import memory_map
from vmctl.memory import GuestMemory
from vmctl.virtio import mmio
from vmctl.virtio.device import F_VERSION_1, ID_PMEM
from vmctl.virtio.driver import MmioDriver, QueueDriver
from vmctl.virtio.pmem import REGION_ALIGN, RET_ERROR, RET_OK, PmemDevice, region_size

QUEUE_BASE = 0x40000
GUEST_START = 0x1_0000_0000


@pytest.fixture
def memory():
    mem = GuestMemory([(0, 8 << 20)])
    yield mem
    mem.close()


@pytest.fixture
def base_file(tmp_path):
    path = tmp_path / "base.raw"
    path.write_bytes(bytes(range(256)) * 4096 + b"tail")  # 1 MiB + 4 bytes: not 2 MiB-sized
    return path


class Rig:
    def __init__(self, path, memory) -> None:
        self.device = PmemDevice(str(path))
        self.device.place(GUEST_START)
        self.memory = memory
        self.transport = mmio.VirtioMmioTransport(self.device, memory, lambda: None)
        self.driver = MmioDriver(self.transport)
        assert self.driver.negotiate(F_VERSION_1) & mmio.FEATURES_OK
        self.queue = QueueDriver(memory, QUEUE_BASE, 16, data_size=1 << 20)
        self.driver.setup_queue(0, self.queue)
        self.driver.driver_ok()

    def request(self, readable: list[bytes], writable: list[int]) -> tuple[list[tuple[int, int]], list[bytes]]:
        posted = self.queue.post(readable, writable)
        self.transport.process_queue(0)
        return self.queue.take_used(), [self.memory.read(a, n) for a, n in posted.writable]

    @property
    def needs_reset(self) -> bool:
        return bool(self.transport.status & mmio.DEVICE_NEEDS_RESET)

    def close(self) -> None:
        self.transport.close()


@pytest.fixture
def rig(base_file, memory):
    made = Rig(base_file, memory)
    yield made
    made.close()


def test_region_is_the_file_rounded_up_to_2_mib():
    assert region_size(1) == REGION_ALIGN
    assert region_size(REGION_ALIGN) == REGION_ALIGN
    assert region_size(REGION_ALIGN + 1) == 2 * REGION_ALIGN


def test_config_space_gives_start_and_size(rig):
    assert rig.driver.read(mmio.DEVICE_ID) == ID_PMEM == 27
    start, size = struct.unpack("<QQ", rig.transport.read(mmio.CONFIG, 16))
    assert (start, size) == (GUEST_START, REGION_ALIGN)
    assert rig.device.features == 0  # no SHMEM_REGION: the config space says where it is


def test_region_maps_the_file_then_zeros(rig, base_file):
    data = base_file.read_bytes()
    mapped = ctypes.string_at(rig.device.host_address, rig.device.size)
    assert mapped[: len(data)] == data
    assert mapped[len(data):] == bytes(rig.device.size - len(data))


def test_region_is_the_files_page_cache_not_a_copy(rig, base_file):
    # MAP_SHARED: a change to the file shows through the mapping at once
    with open(base_file, "r+b") as handle:
        handle.write(b"CHANGED")
    assert ctypes.string_at(rig.device.host_address, 7) == b"CHANGED"


def test_flush_fsyncs_and_answers_ok(rig):
    used, (reply,) = rig.request([struct.pack("<I", 0)], [4])
    assert used[0][1] == 4 and struct.unpack("<I", reply)[0] == RET_OK
    assert rig.device.flushes == 1 and not rig.needs_reset


def test_request_split_over_descriptors(rig):
    used, (reply,) = rig.request([b"\0\0", b"\0\0"], [4])
    assert struct.unpack("<I", reply)[0] == RET_OK and not rig.needs_reset


def test_unknown_request_type_is_an_error_reply_not_a_reset(rig):
    used, (reply,) = rig.request([struct.pack("<I", 7)], [4])
    assert used[0][1] == 4 and struct.unpack("<I", reply)[0] == RET_ERROR
    assert rig.device.flushes == 0 and not rig.needs_reset


@pytest.mark.parametrize("readable, writable", [
    ([b"\0\0"], [4]),  # short request
    ([], [4, 4]),  # only device-writable buffers: no request at all
    ([struct.pack("<I", 0)], []),  # no room for the reply
    ([struct.pack("<I", 0)], [2]),  # a reply buffer too small
])
def test_malformed_requests_put_the_device_in_needs_reset(rig, readable, writable):
    rig.queue.post(readable, writable)
    rig.transport.process_queue(0)
    assert rig.needs_reset and rig.device.flushes == 0


def test_empty_file_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.touch()
    with pytest.raises(OSError, match="empty"):
        PmemDevice(str(empty))


def test_close_unmaps_and_closes(base_file):
    device = PmemDevice(str(base_file))
    fd = device.fd
    device.close()
    assert device.host_address == 0 and device.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    device.close()  # idempotent


class FakeHost:
    """The machine side of a slot, recording the read-only slot it is asked for."""

    def __init__(self, memory) -> None:
        self.memory = memory
        self.slots: list[tuple[int, int, int]] = []
        self.next = memory_map.device_memory_base(memory.size)

    def guest_memory(self):
        return self.memory

    def vcpu_count(self) -> int:
        return 1

    def irq_line(self, gsi):
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

        class Line:
            eventfd = fd

            def trigger(self) -> None:
                os.eventfd_write(fd, 1)
        return Line()

    def register_ioeventfd(self, eventfd, address, length, datamatch=None) -> None:
        pass

    def map_device_memory(self, host_address: int, size: int) -> int:
        address = self.next
        self.slots.append((address, size, host_address))
        self.next = memory_map.align_device_memory(address + size)
        return address


def test_factory_places_the_region_in_a_read_only_slot_above_ram(base_file, memory):
    from vmctl.virtio.factories import pmem

    host = FakeHost(memory)
    slot = pmem(base_file).attach(host, memory_map.VIRTIO_MMIO_BASE, 5)
    try:
        device = slot.device
        assert host.slots == [(1 << 32, REGION_ALIGN, device.host_address)]
        assert struct.unpack("<QQ", slot.read(mmio.CONFIG, 16)) == (1 << 32, REGION_ALIGN)
    finally:
        slot.close()


@pytest.mark.parametrize("memory_size, base", [
    (256 << 20, 1 << 32),  # above the 32-bit MMIO gap
    (3 << 30, 1 << 32),
    ((4 << 30) + 1, (5 << 30) + (128 << 20)),  # RAM past 4 GiB ends at 5 GiB + 1: next 128 MiB
])
def test_device_memory_starts_above_ram_and_the_mmio_gap(memory_size, base):
    assert memory_map.device_memory_base(memory_size) == base
    assert base % memory_map.DEVICE_MEMORY_ALIGN == 0
