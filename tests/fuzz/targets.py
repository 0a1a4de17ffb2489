"""Fuzz targets: hypothesis properties over hostile inputs. Each returns normally or raises
the error type its layer promises (one line for the user); anything else is a finding.

Run one for a while: `scripts/fuzz TARGET SECONDS` (tests/fuzz/run.py drives hypothesis's
fuzz_one_input with random and corpus buffers). tests/unit/test_fuzz_targets.py runs every
target briefly in CI. Targets: qcow2, virtqueue, blk, rng, net (a real TAP), console,
spec.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmctl.disk import DiskError, ImageCorruptError
from vmctl.disk.qcow2 import Qcow2Image
from vmctl.disk.qcow2.check import check
from vmctl.errors import VmctlError
from vmctl.memory import GuestMemory
from vmctl.virtio.device import DeviceError, QueueContext
from vmctl.virtio.queue import QueueError, Virtqueue

CORPUS = Path(__file__).parent / "corpus"
SETTINGS = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))

# --- qcow2 opener, reader, checker and (refused or clean) writer --------------------------

_SEEDS: list[bytes] = []


def qcow2_seeds() -> list[bytes]:
    if not _SEEDS:
        _SEEDS.extend(p.read_bytes() for p in sorted((CORPUS / "qcow2").glob("*.qcow2")))
    return _SEEDS


@SETTINGS
@given(seed=st.integers(0, 63), mutations=st.lists(
    st.tuples(st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)), min_size=1,
    max_size=6))
def qcow2(seed, mutations):
    seeds = qcow2_seeds()
    data = bytearray(seeds[seed % len(seeds)])
    for offset, blob in mutations:
        offset %= len(data)
        data[offset:offset + len(blob)] = blob[: len(data) - offset]
    with tempfile.TemporaryDirectory(prefix="vmctl-fuzz-") as work:
        path = os.path.join(work, "f.qcow2")
        with open(path, "wb") as file:
            file.write(data)
        try:
            with Qcow2Image(path, read_only=True, open_backing=False) as disk:
                for offset in (0, disk.size // 2):
                    length = min(65536, disk.size - offset)
                    if length > 0:
                        disk.read(offset, length)
        except DiskError:
            pass
        try:
            check(path)
        except DiskError:
            pass
        before = bytes(data)
        try:
            with Qcow2Image(path, read_only=False, open_backing=False) as disk:
                disk.pwrite(0, b"fuzz")
                disk.flush()
        except ImageCorruptError:
            after = open(path, "rb").read()
            assert after[:72] + after[80:] == before[:72] + before[80:], "wrote more than the bit"
        except DiskError:
            assert open(path, "rb").read() == before, "a refused open changed the file"


# --- virtqueue descriptor walker and the devices' request parsers --------------------------

RAM_A, RAM_B = (0, 1 << 20), (2 << 20, 1 << 20)  # two regions with a hole: crossing buffers
_MEMORY: list[GuestMemory] = []
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
ADDRESSES = [0x10000, 0x20000, RAM_A[1] - 8, RAM_B[0], RAM_B[0] + RAM_B[1] - 16, DESC, AVAIL,
             USED, 0, (1 << 64) - 16, 5 << 20]
LENGTHS = [0, 1, 8, 16, 17, 512, 4096, 0x10000, 0xFFFFFFFF, 0x80000000]


def memory() -> GuestMemory:
    if not _MEMORY:
        _MEMORY.append(GuestMemory([RAM_A, RAM_B]))
    return _MEMORY[0]


descriptor = st.tuples(st.sampled_from(ADDRESSES) | st.integers(0, 4 << 20),
                       st.sampled_from(LENGTHS) | st.integers(0, 1 << 32 - 1),
                       st.integers(0, 7), st.integers(0, 20))
ring = st.fixed_dictionaries({
    "size": st.sampled_from([1, 2, 4, 8, 16]),
    "descriptors": st.lists(descriptor, min_size=1, max_size=16),
    "indirect": st.lists(descriptor, max_size=8),
    "avail_idx": st.integers(0, 0xFFFF),
    "heads": st.lists(st.integers(0, 20), max_size=16),
    "last_avail": st.integers(0, 0xFFFF),
})


def build_queue(r: dict) -> Virtqueue:
    mem = memory()
    mem.write(DESC, bytes(16 * 16))
    for index, (address, length, flags, nxt) in enumerate(r["descriptors"][: r["size"]]):
        mem.write(DESC + 16 * index, struct.pack("<QIHH", address & (1 << 64) - 1,
                                                 length & 0xFFFFFFFF, flags, nxt))
    for index, (address, length, flags, nxt) in enumerate(r["indirect"]):
        mem.write(0x4000 + 16 * index, struct.pack("<QIHH", address & (1 << 64) - 1,
                                                   length & 0xFFFFFFFF, flags, nxt))
    heads = r["heads"] + [0] * (r["size"] - len(r["heads"]))
    mem.write(AVAIL, struct.pack(f"<HH{r['size']}HH", 0, r["avail_idx"], *heads[: r["size"]],
                                 0))
    queue = Virtqueue(mem, 16)
    queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = r["size"], DESC, AVAIL, USED
    queue.activate(event_idx=False, indirect=True)
    queue.last_avail = r["last_avail"]
    return queue


def _chains(queue: Virtqueue):
    for _ in range(queue.size):
        chain = queue.pop()
        if chain is None:
            return
        for address, length in chain.readable_ranges + chain.writable_ranges:
            assert memory().contains(address, max(length, 1)) or length == 0, \
                f"buffer {address:#x}+{length} outside RAM accepted"
        yield chain


@SETTINGS
@given(r=ring)
def virtqueue(r):
    try:
        for _ in _chains(build_queue(r)):
            pass
    except QueueError:
        pass


class _Sink:
    def __init__(self) -> None:
        self.completed: list[tuple[int, int]] = []

    def __call__(self, queue, chain, written) -> None:
        assert 0 <= written <= chain.writable_length, "device claims more than it may write"
        self.completed.append((chain.head, written))


_BLK: list = []
_WORK: list[str] = []  # temporary folders of the device targets, removed by cleanup()


def blk_device():
    if not _BLK:
        from vmctl.virtio.blk import open_block_device
        work = tempfile.mkdtemp(prefix="vmctl-fuzz-blk-")
        _WORK.append(work)
        path = os.path.join(work, "disk.raw")
        with open(path, "wb") as file:
            file.truncate(1 << 20)
        _BLK.append(open_block_device(path))
    return _BLK[0]


request = st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 99]), st.integers(0, 1 << 64 - 1))


@SETTINGS
@given(r=ring, header=request)
def blk(r, header):
    mem = memory()
    mem.write(0x10000, struct.pack("<IIQ", header[0], 0, header[1] & (1 << 64) - 1))
    device, sink = blk_device(), _Sink()
    ctx = QueueContext(mem, sink)
    try:
        for chain in _chains(build_queue(r)):
            try:
                sink(None, chain, device.handle(chain, ctx))
            except DeviceError:
                pass
    except QueueError:
        pass


@SETTINGS
@given(r=ring)
def rng(r):
    from vmctl.virtio.rng import RngDevice
    device, sink = RngDevice(), _Sink()
    try:
        device.process(0, build_queue(r), QueueContext(memory(), sink))
    except (QueueError, DeviceError):
        pass
    finally:
        device.close()


_NET: list = []


def net_device():
    """One real TAP (isolated /30) for the whole fuzz session: frames go out of it."""
    if not _NET:
        from vmctl.net import host as hostnet
        from vmctl.virtio.net import NetDevice
        network = hostnet.HostNetwork("isolated").open()
        device = NetDevice(network.tap, network.mac, on_close=network.close)
        _NET.append(device)
    return _NET[0]


@SETTINGS
@given(r=ring, frame=st.binary(max_size=64))
def net(r, frame):
    """virtio-net TX: headers shorter than 12 bytes, odd offload fields, oversize frames."""
    mem = memory()
    mem.write(0x10000, frame)
    device, sink = net_device(), _Sink()
    try:
        device.process(1, build_queue(r), QueueContext(mem, sink))
    except (QueueError, DeviceError):
        pass


_CONSOLE: list = []


def console_device():
    """A real virtio-console with a connected client on its unix socket."""
    if not _CONSOLE:
        import socket

        from vmctl.virtio.console import ConsoleDevice
        work = tempfile.mkdtemp(prefix="vmctl-fuzz-console-")
        _WORK.append(work)
        device = ConsoleDevice(os.path.join(work, "console.sock"))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(device.socket_path)
        client.setblocking(False)
        device._accept()
        _CONSOLE.append((device, client))
    return _CONSOLE[0]


@SETTINGS
@given(r=ring, typed=st.binary(max_size=32))
def console(r, typed):
    """virtio-console: guest output (TX) and host input into guest buffers (RX)."""
    device, client = console_device()
    mem, sink = memory(), _Sink()
    ctx = QueueContext(mem, sink)
    device.activate(0, ctx)
    try:
        if typed:
            try:
                client.send(typed)
            except BlockingIOError:
                pass  # the guest posts no receive buffers: the socket backs up, as it should
        device.process(1, build_queue(r), ctx)
        device.process(0, build_queue(r), ctx)
    except (QueueError, DeviceError):
        pass
    try:
        while client.recv(65536):
            pass
    except BlockingIOError:
        pass


# --- the YAML spec loader -----------------------------------------------------------------

_SPEC_LINES: list[str] = []


def spec_lines() -> list[str]:
    if not _SPEC_LINES:
        for path in sorted((CORPUS / "spec").glob("*.yaml")):
            _SPEC_LINES.extend(path.read_text().splitlines())
    return _SPEC_LINES


@SETTINGS
@given(picks=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 8),
                                st.text(max_size=6)), min_size=1, max_size=25))
def spec(picks):
    from vmctl.spec import parse_spec
    lines = spec_lines()
    text = "\n".join(" " * indent + lines[index % len(lines)] + extra
                     for index, indent, extra in picks)
    try:
        parse_spec(text, source="fuzz.yaml", base_dir=Path("/nonexistent-fuzz-dir"))
    except VmctlError as error:
        assert "\n" not in str(error).strip() or "fuzz.yaml" in str(error)


def cleanup() -> None:
    """Close the devices the targets opened and remove their folders."""
    import shutil

    for device in _BLK:
        device.close()
    for device, client in _CONSOLE:
        client.close()
        device.close()
    for device in _NET:
        device.close()
    _BLK.clear(), _CONSOLE.clear(), _NET.clear()
    for work in _WORK:
        shutil.rmtree(work, ignore_errors=True)
    _WORK.clear()


TARGETS = {"qcow2": qcow2, "virtqueue": virtqueue, "blk": blk, "rng": rng, "net": net,
           "console": console, "spec": spec}
