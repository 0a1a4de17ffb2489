"""virtio-blk and virtio-rng request handling, with an in-test driver writing descriptors
into guest memory and real disk files underneath."""

from __future__ import annotations

import os
import struct

import pytest

from vmctl.disk.qcow2.create import create as create_qcow2
from vmctl.memory import GuestMemory
from vmctl.virtio import blk, mmio
from vmctl.virtio.device import F_INDIRECT_DESC, F_VERSION_1
from vmctl.virtio.driver import MmioDriver, QueueDriver
from vmctl.virtio.rng import MAX_REQUEST, RngDevice

QUEUE_BASE = 0x40000
DISK_SIZE = 1 << 20


@pytest.fixture
def memory():
    mem = GuestMemory([(0, 8 << 20)])
    yield mem
    mem.close()


@pytest.fixture
def disk_file(tmp_path):
    path = tmp_path / "disk.raw"
    data = bytearray(DISK_SIZE)
    for sector in range(DISK_SIZE // 512):
        data[sector * 512 : sector * 512 + 8] = struct.pack("<Q", sector)
    path.write_bytes(bytes(data))
    return path


class Rig:
    def __init__(self, device, memory) -> None:
        self.memory = memory
        self.irqs = 0
        self.transport = mmio.VirtioMmioTransport(device, memory, self._irq)
        self.driver = MmioDriver(self.transport)
        assert self.driver.negotiate(F_VERSION_1 | F_INDIRECT_DESC) & mmio.FEATURES_OK
        self.queue = QueueDriver(memory, QUEUE_BASE, 64, data_size=4 << 20)
        self.driver.setup_queue(0, self.queue)
        self.driver.driver_ok()

    def _irq(self) -> None:
        self.irqs += 1

    def run(self) -> list[tuple[int, int]]:
        self.transport.process_queue(0)
        return self.queue.take_used()

    def close(self) -> None:
        self.transport.close()


@pytest.fixture
def blk_rig(memory, disk_file):
    rigs = []

    def make(read_only: bool = False, path=None) -> Rig:
        rig = Rig(blk.open_block_device(str(path or disk_file), read_only=read_only, serial="vmctl-serial-0001"), memory)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def request(rig: Rig, kind: int, sector: int = 0, data: list[bytes] = (), read: list[int] = (), indirect=False):
    """Post one request; returns (status, used length, contents of each data-in buffer)."""
    posted = rig.queue.post([header(kind, sector), *data], [*read, 1], indirect=indirect)
    used = rig.run()
    assert [head for head, _ in used] == [posted.head]
    buffers = [rig.memory.read(a, n) for a, n in posted.writable]
    return buffers[-1][0], used[0][1], buffers[:-1]


def test_config_space_describes_the_disk(blk_rig):
    rig = blk_rig()
    config = rig.transport.read(mmio.CONFIG, 8)
    assert struct.unpack("<Q", config)[0] == DISK_SIZE // 512
    assert struct.unpack("<I", rig.transport.read(mmio.CONFIG + 20, 4))[0] == 512  # blk_size
    features = rig.driver.device_features()
    assert features & blk.F_FLUSH and features & blk.F_DISCARD and not features & blk.F_RO


@pytest.mark.parametrize("indirect", [False, True])
def test_read_scatters_into_several_buffers(blk_rig, indirect):
    rig = blk_rig()
    status, used, (first, second) = request(rig, blk.T_IN, 3, read=[512, 1024], indirect=indirect)
    assert status == blk.S_OK and used == 1537
    assert struct.unpack("<Q", first[:8])[0] == 3 and struct.unpack("<Q", second[512:520])[0] == 5


def test_write_gathers_from_a_split_header_and_reaches_the_file(blk_rig, disk_file):
    rig = blk_rig()
    hdr = header(blk.T_OUT, 10)
    status, used, _ = request(rig, blk.T_OUT, 10, data=[b"A" * 512, b"B" * 512])
    assert status == blk.S_OK and used == 1
    # The same request with the header cut in two descriptors.
    posted = rig.queue.post([hdr[:5], hdr[5:], b"C" * 512], [1])
    assert rig.run() == [(posted.head, 1)]
    status, _, _ = request(rig, blk.T_FLUSH)
    assert status == blk.S_OK
    content = disk_file.read_bytes()
    assert content[10 * 512 : 11 * 512] == b"C" * 512 and content[11 * 512 : 12 * 512] == b"B" * 512


def test_get_id_returns_the_serial(blk_rig):
    status, used, (serial,) = request(blk_rig(), blk.T_GET_ID, read=[20])
    assert status == blk.S_OK and serial == b"vmctl-serial-0001\0\0\0" and used == 21


@pytest.mark.parametrize("kind", [blk.T_DISCARD, blk.T_WRITE_ZEROES])
def test_discard_and_write_zeroes_make_ranges_read_as_zero(blk_rig, disk_file, kind):
    rig = blk_rig()
    segments = struct.pack("<QII", 4, 2, 0) + struct.pack("<QII", 100, 1, 1)
    status, _, _ = request(rig, kind, data=[segments])
    assert status == blk.S_OK
    content = disk_file.read_bytes()
    assert content[4 * 512 : 6 * 512] == bytes(1024) and content[100 * 512 : 101 * 512] == bytes(512)
    assert content[6 * 512 : 6 * 512 + 8] == struct.pack("<Q", 6)


@pytest.mark.parametrize(
    "kind, sector, data, read, expected",
    [
        (blk.T_IN, DISK_SIZE // 512, [], [512], blk.S_IOERR),  # past the end
        (blk.T_IN, DISK_SIZE // 512 - 1, [], [1024], blk.S_IOERR),  # runs off the end
        (blk.T_IN, 0, [], [100], blk.S_IOERR),  # not a whole sector
        (blk.T_OUT, 2**60, [b"x" * 512], [], blk.S_IOERR),
        (blk.T_DISCARD, 0, [b"short"], [], blk.S_IOERR),
        (blk.T_DISCARD, 0, [struct.pack("<QII", 0, 1, 2)], [], blk.S_UNSUPP),  # unknown flag
        (blk.T_WRITE_ZEROES, 0, [struct.pack("<QII", 2**40, 1, 0)], [], blk.S_IOERR),
        (99, 0, [], [], blk.S_UNSUPP),
    ],
)
def test_bad_requests_get_an_error_status(blk_rig, kind, sector, data, read, expected):
    status, _, _ = request(blk_rig(), kind, sector, data=data, read=read)
    assert status == expected


def test_read_only_disk_refuses_writes_and_says_so(blk_rig, disk_file):
    rig = blk_rig(read_only=True)
    assert rig.driver.device_features() & blk.F_RO
    before = disk_file.read_bytes()
    assert request(rig, blk.T_OUT, 0, data=[b"x" * 512])[0] == blk.S_IOERR
    assert request(rig, blk.T_DISCARD, data=[struct.pack("<QII", 0, 1, 0)])[0] == blk.S_IOERR
    assert request(rig, blk.T_IN, 0, read=[512])[0] == blk.S_OK
    assert disk_file.read_bytes() == before


def test_request_without_status_byte_puts_device_in_needs_reset(blk_rig):
    rig = blk_rig()
    rig.queue.post([header(blk.T_IN)], [])
    assert rig.run() == []
    assert rig.driver.read(mmio.STATUS) & mmio.DEVICE_NEEDS_RESET


def test_qcow2_image_through_the_same_device(blk_rig, tmp_path):
    path = str(tmp_path / "disk.qcow2")
    create_qcow2(path, DISK_SIZE)
    rig = blk_rig(path=path)
    assert request(rig, blk.T_OUT, 7, data=[b"q" * 512])[0] == blk.S_OK
    status, _, (data,) = request(rig, blk.T_IN, 7, read=[512])
    assert status == blk.S_OK and data == b"q" * 512


def test_rng_fills_buffers_and_caps_requests(memory):
    rig = Rig(RngDevice(), memory)
    try:
        posted = rig.queue.post([], [64, 64])
        assert rig.run() == [(posted.head, 128)]
        assert rig.memory.read(posted.writable[0][0], 64) != bytes(64)
        posted = rig.queue.post([], [MAX_REQUEST, 4096])
        assert rig.run() == [(posted.head, MAX_REQUEST)]
        assert rig.irqs == 2
    finally:
        rig.close()


def test_rng_device_closes_its_fd(memory):
    device = RngDevice()
    fd = device.fd
    device.close()
    with pytest.raises(OSError):
        os.fstat(fd)
