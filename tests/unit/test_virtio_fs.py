"""virtio-fs: FUSE requests posted on the device's queues by an in-test driver, answered
from a real folder; the same server as `vmctl share mount`."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from vmctl.cli.boot import parse_fs_option
from vmctl.errors import VmctlError
from vmctl.fs import protocol as p
from vmctl.memory import GuestMemory
from vmctl.virtio import mmio
from vmctl.virtio.device import F_INDIRECT_DESC, F_VERSION_1
from vmctl.virtio.driver import MmioDriver, QueueDriver
from vmctl.virtio.fs import ID_FS, FsDevice


class FsRig:
    def __init__(self, device: FsDevice, memory: GuestMemory) -> None:
        self.memory = memory
        self.transport = mmio.VirtioMmioTransport(device, memory, lambda: None)
        self.driver = MmioDriver(self.transport)
        assert self.driver.negotiate(F_VERSION_1 | F_INDIRECT_DESC) & mmio.FEATURES_OK
        self.hiprio = QueueDriver(memory, 0x40000, 64, data_size=1 << 20)
        self.requests = QueueDriver(memory, 0x200000, 256, data_size=4 << 20)
        self.driver.setup_queue(0, self.hiprio)
        self.driver.setup_queue(1, self.requests)
        self.driver.driver_ok()
        self.unique = 0

    def call(self, opcode: int, nodeid: int, body: bytes = b"", reply_room: int = 4096, queue: int = 1) -> tuple[int, bytes]:
        self.unique += 1
        header = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0, 0)
        driver = self.requests if queue == 1 else self.hiprio
        # header and arguments in separate descriptors, as Linux posts them
        posted = driver.post([header, body] if body else [header], [p.OUT_HEADER.size, reply_room] if reply_room else [])
        self.transport.process_queue(queue)
        used = driver.take_used()
        assert [head for head, _ in used] == [posted.head]
        written = used[0][1]
        if not written:
            return 0, b""
        data = b"".join(self.memory.read(address, length) for address, length in posted.writable)[:written]
        length, error, unique = p.OUT_HEADER.unpack_from(data)
        assert unique == self.unique and length == written
        return -error, data[p.OUT_HEADER.size :]


@pytest.fixture
def rig(tmp_path):
    memory = GuestMemory([(0, 16 << 20)])
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "hello").write_bytes(b"hello from the host")
    rig = FsRig(FsDevice(str(tmp_path / "share"), "myshare"), memory)
    yield rig, tmp_path / "share"
    rig.transport.close()
    memory.close()


def test_config_space_holds_the_tag_and_one_request_queue(rig):
    r, _ = rig
    assert r.driver.read(mmio.DEVICE_ID) == ID_FS
    config = r.transport.read(0x100, 40)
    assert config[:36].rstrip(b"\0") == b"myshare" and struct.unpack_from("<I", config, 36)[0] == 1


def test_init_lookup_read_write_through_the_queues(rig):
    r, share = rig
    error, payload = r.call(p.INIT, 0, p.INIT_IN.pack(7, 36, 65536, 0) + bytes(48))
    assert error == 0 and p.INIT_OUT.unpack(payload)[:2] == (7, 31)
    error, payload = r.call(p.LOOKUP, 1, b"hello\0")
    nodeid = p.ENTRY_OUT.unpack_from(payload)[0]
    # `cache: auto`: opens need no message, READ/WRITE come with handle 0 and the node id
    assert r.call(p.OPEN, nodeid, p.OPEN_IN.pack(os.O_RDWR, 0))[0] == errno.ENOSYS
    fh = 0
    assert r.call(p.READ, nodeid, p.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))[1] == b"hello from the host"
    data = b"G" * 100_000  # spread over the readable descriptors like a large WRITE
    error, payload = r.call(p.WRITE, nodeid, p.WRITE_IN.pack(fh, 0, len(data), 0, 0, 0, 0) + data)
    assert error == 0 and p.WRITE_OUT.unpack(payload)[0] == len(data)
    assert (share / "hello").read_bytes() == data
    # a READ bigger than the driver's reply buffer is cut to what was asked
    assert r.call(p.READ, nodeid, p.READ_IN.pack(fh, 0, 1000, 0, 0, 0, 0), reply_room=1000)[1] == data[:1000]


def test_forget_on_the_hiprio_queue_gets_no_reply(rig):
    r, _ = rig
    r.call(p.INIT, 0, p.INIT_IN.pack(7, 36, 65536, 0) + bytes(48))
    nodeid = p.ENTRY_OUT.unpack_from(r.call(p.LOOKUP, 1, b"hello\0")[1])[0]
    assert r.call(p.FORGET, nodeid, p.FORGET_IN.pack(1), reply_room=0, queue=0) == (0, b"")
    assert r.call(p.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0))[0] == errno.ESTALE


def test_escape_through_the_device_is_refused(rig):
    r, share = rig
    assert r.call(p.LOOKUP, 1, b"..\0")[0] == errno.EACCES
    assert r.call(p.MKDIR, 1, p.MKDIR_IN.pack(0o755, 0) + b"../x\0")[0] == errno.EACCES


def test_a_request_without_a_header_needs_reset(rig):
    r, _ = rig
    r.requests.post([b"\0" * 8], [64])
    r.transport.process_queue(1)
    assert r.driver.read(mmio.STATUS) & mmio.DEVICE_NEEDS_RESET


def test_reset_forgets_the_old_drivers_nodes(rig):
    r, _ = rig
    r.call(p.INIT, 0, p.INIT_IN.pack(7, 36, 65536, 0) + bytes(48))
    nodeid = p.ENTRY_OUT.unpack_from(r.call(p.LOOKUP, 1, b"hello\0")[1])[0]
    r.transport.device.reset()
    assert r.call(p.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0))[0] == errno.ESTALE


def test_boot_option_parsing(tmp_path):
    assert parse_fs_option(f"{tmp_path},tag=src,ro").label == "fs:src"
    device = parse_fs_option(f"{tmp_path},tag=src,cache=always").make()
    assert device.server.timeout == 86400
    device.reset()  # a new driver's server keeps the share's cache mode
    assert device.server.cache.mode == "always"
    device.close()
    with pytest.raises(VmctlError, match="cache=sometimes: expected one of auto, always, never"):
        parse_fs_option(f"{tmp_path},tag=a,cache=sometimes")
    for bad in (f"{tmp_path}", f"{tmp_path},tag=" + "x" * 37, f"{tmp_path / 'nope'},tag=a", f"{tmp_path},tag=a,bogus"):
        with pytest.raises(VmctlError):
            parse_fs_option(bad)
