"""Fuzz targets: hypothesis properties over hostile inputs. Each returns normally or raises
the error type its layer promises (one line for the user); anything else is a finding.

Run one for a while: `scripts/fuzz TARGET SECONDS` (tests/fuzz/run.py drives hypothesis's
fuzz_one_input with random and corpus buffers). tests/unit/test_fuzz_targets.py runs every
target briefly in CI. Targets: qcow2, virtqueue, blk, rng, net (TX over a real TAP),
net_rx (frames into the TAP, then into guest buffers), console, spec, fuse (the FUSE file
server), fs (virtio-fs rings), pmem, oci_layer (layer tars), oci_image (whole image archives), oci_layout (edited and
re-digested layout documents).
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
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


@SETTINGS
@given(r=ring, frames=st.lists(st.binary(min_size=0, max_size=1600) | st.sampled_from(
    [b"", b"\xff" * 14, bytes(60), bytes(1514), bytes(9000)]), max_size=4),
    mrg=st.booleans(), kicks=st.integers(1, 3))
def net_rx(r, frames, mrg, kicks):
    """virtio-net RX: frames arrive on the real TAP (sent into it through an AF_PACKET
    socket on its interface) and go into guest buffers the fuzzer laid out: short and
    zero-length buffers, too few buffers, with and without MRG_RXBUF."""
    from vmctl.virtio.net import F_GUEST_CSUM, F_MRG_RXBUF, RX
    device, sink = net_device(), _Sink()
    ctx = QueueContext(memory(), sink, complete_many=lambda queue, used: sink.completed.extend(used))
    device.reset()
    _drain_tap(device)
    device.activate(F_GUEST_CSUM | (F_MRG_RXBUF if mrg else 0), ctx)
    sender = net_sender()
    for frame in frames:
        try:
            sender.send(frame.ljust(14, b"\0"))  # an Ethernet header at least
        except OSError:
            pass  # too big for the link: not a frame the guest can be sent
    queue = build_queue(r)
    for _ in range(kicks):
        try:
            device.process(RX, queue, ctx)
        except (QueueError, DeviceError):
            break
    for head, written in sink.completed:  # complete_many: one entry per used chain
        assert 0 <= written <= MAX_FRAME_BYTES and 0 <= head < 16, (head, written)


MAX_FRAME_BYTES = 65550 + 12
_SENDER: list = []


def net_sender():
    """An AF_PACKET socket on the fuzz TAP's interface: what it sends, the TAP fd reads."""
    if not _SENDER:
        import socket
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sock.bind((net_device().tap.name, 0))
        sock.setblocking(False)
        _SENDER.append(sock)
    return _SENDER[0]


def _drain_tap(device) -> None:
    while True:
        try:
            os.read(device.tap.fd, 1 << 17)
        except BlockingIOError:
            return


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


_PMEM: list = []


def pmem_device():
    """A real virtio-pmem device over a small temporary file (mapped read-only)."""
    if not _PMEM:
        from vmctl.virtio.pmem import PmemDevice
        work = tempfile.mkdtemp(prefix="vmctl-fuzz-pmem-")
        _WORK.append(work)
        path = os.path.join(work, "pmem.img")
        with open(path, "wb") as file:
            file.write(b"p" * 8192)
        _PMEM.append(PmemDevice(path))
    return _PMEM[0]


@SETTINGS
@given(r=ring, kind=st.sampled_from([0, 1, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF),
       header=st.binary(max_size=8))
def pmem(r, kind, header):
    """virtio-pmem requests on fuzzed rings: short requests and replies, split words."""
    mem = memory()
    mem.write(0x10000, struct.pack("<I", kind) + header)
    device, sink = pmem_device(), _Sink()
    try:
        device.process(0, build_queue(r), QueueContext(mem, sink))
    except (QueueError, DeviceError):
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


# --- the FUSE server (vmctl share mount and virtio-fs) ------------------------------------

NAMES = [b"a", b"dir", b"file", b"link", b"up", b"new", b"..", b".", b"", b"/etc", b"a/b",
         b"x" * 256, b"\xff\xfe", b"fifo"]
FUSE_OPS = list(range(1, 52)) + [4096, 0xFFFFFFFF]
U32, U64 = st.integers(0, 0xFFFFFFFF), st.integers(0, (1 << 64) - 1)
FIELDS = [0, 1, 2, 3, 4, 8, 0o777, 0o4755, 0x8000 | 0o644, 0x1000, 0x6000, 0x41, 0x242,
          1 << 31, 1 << 63, (1 << 64) - 1]
fuse_request = st.tuples(
    st.sampled_from([1, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 25, 27, 28,
                     29, 30, 35, 44, 45]) | st.sampled_from(FUSE_OPS),
    st.sampled_from([1, 2, 3, 4, 5, 6, 7, 0, 1 << 63]) | U64,  # node ids
    st.lists(st.sampled_from(FIELDS) | U64, max_size=6).map(lambda f: f + [0] * (16 - len(f))),
    # argument fields, packed by the opcode's layout (few drawn: a fuzz buffer is short)
    st.lists(st.sampled_from(NAMES) | st.binary(max_size=8), max_size=3),  # names after them
    st.sampled_from([0, 1000, 0xFFFFFFFF]),  # uid/gid
    st.sampled_from([0, 0, 0, -1, 1, -8, 64]) | st.integers(-64, 64))  # header length fiddle


def _fuse_bytes(opcode: int, nodeid: int, fields: list[int], names: list[bytes], uid: int,
                fiddle: int) -> bytes:
    from vmctl.fs import protocol as fp
    layouts = {fp.GETATTR: fp.GETATTR_IN, fp.SETATTR: fp.SETATTR_IN, fp.MKNOD: fp.MKNOD_IN,
               fp.MKDIR: fp.MKDIR_IN, fp.RENAME: fp.RENAME_IN, fp.RENAME2: fp.RENAME2_IN,
               fp.LINK: fp.LINK_IN, fp.OPEN: fp.OPEN_IN, fp.CREATE: fp.CREATE_IN,
               fp.READ: fp.READ_IN, fp.WRITE: fp.WRITE_IN, fp.RELEASE: fp.RELEASE_IN,
               fp.RELEASEDIR: fp.RELEASE_IN, fp.FLUSH: fp.FLUSH_IN, fp.FSYNC: fp.FSYNC_IN,
               fp.FSYNCDIR: fp.FSYNC_IN, fp.FORGET: fp.FORGET_IN, fp.INIT: fp.INIT_IN,
               fp.OPENDIR: fp.OPEN_IN, fp.READDIR: fp.READ_IN, fp.READDIRPLUS: fp.READ_IN,
               fp.BATCH_FORGET: fp.BATCH_FORGET_IN}
    layout = layouts.get(opcode)
    body = b""
    if layout is not None:
        codes = layout.format.lstrip("<").replace("x", "")
        values = []
        for code, value in zip(codes, fields):
            bits = struct.calcsize(code) * 8
            values.append(value & ((1 << bits) - 1))
        body = layout.pack(*values)
    if opcode == fp.BATCH_FORGET:
        body += b"".join(fp.FORGET_ONE.pack(f & 7, f >> 60) for f in fields[2:6])
    body += b"".join(name + b"\0" for name in names)
    if opcode == fp.WRITE:
        body += b"w" * (fields[2] & 0xFF)
    length = max(0, fp.IN_HEADER.size + len(body) + fiddle) & 0xFFFFFFFF
    header = fp.IN_HEADER.pack(length, opcode & 0xFFFFFFFF, nodeid & 0xFFFF, nodeid & ((1 << 64) - 1),
                               uid, uid, 1, 0, 0)
    return (header + body)[: max(length, 0) if fiddle < 0 else None]


def _fuse_root(work: str) -> tuple[str, str]:
    """A shared folder and, next to it, a folder the guest must never reach."""
    root, outside = os.path.join(work, "share"), os.path.join(work, "outside")
    os.makedirs(os.path.join(root, "dir"))
    os.makedirs(outside)
    for folder in (root, outside):
        with open(os.path.join(folder, "file"), "wb") as file:
            file.write(b"0123456789" * 10)
    os.symlink("../outside", os.path.join(root, "up"))
    os.symlink("/etc", os.path.join(root, "link"))
    os.mkfifo(os.path.join(root, "fifo"))
    return root, outside


def _tree(folder: str) -> list:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            found.append((path, info.st_mode, info.st_size, info.st_uid, info.st_mtime_ns))
    return found


@SETTINGS
@given(requests=st.lists(fuse_request, min_size=1, max_size=12), read_only=st.booleans(),
       cache=st.sampled_from(["auto", "always", "never"]))
def fuse(requests, read_only, cache):
    """FUSE requests, well-formed and not, against the real file server over a temporary
    share: every request gets a well-formed reply (or none for FORGET), never an exception,
    and nothing outside the share changes."""
    from vmctl.fs import protocol as fp
    from vmctl.fs.server import FileServer
    with tempfile.TemporaryDirectory(prefix="vmctl-fuzz-fuse-") as work:
        root, outside = _fuse_root(work)
        before = _tree(outside) + [(p, os.stat(p).st_mode) for p in ("/etc", "/etc/passwd")]
        server = FileServer(root, read_only=read_only, cache=cache)
        try:
            z = [0] * 16
            prologue = [(fp.INIT, 1, [7, 31, 0, 0] + z[4:], [], 0, 0),  # so that the fuzzed
                        (fp.LOOKUP, 1, z, [b"file"], 0, 0),  # requests find node 2 a file,
                        (fp.LOOKUP, 1, z, [b"dir"], 0, 0),  # node 3 a directory, node 4 a
                        (fp.LOOKUP, 1, z, [b"up"], 0, 0),  # symlink out, handle 1 an open
                        (fp.OPEN, 2, [os.O_RDWR] + z[1:], [], 0, 0),  # file, 2 a directory
                        (fp.OPENDIR, 3, z, [], 0, 0)]
            for request in [*prologue, *requests]:
                data = _fuse_bytes(*request)
                answer = server.handle(data)
                if answer is None:
                    continue
                length, error, unique = fp.OUT_HEADER.unpack_from(answer)
                assert length == len(answer) and error <= 0, (length, error, len(answer))
                if len(data) >= fp.IN_HEADER.size:
                    assert unique == fp.IN_HEADER.unpack_from(data)[2]
        finally:
            server.close()
        after = _tree(outside) + [(p, os.stat(p).st_mode) for p in ("/etc", "/etc/passwd")]
        assert before == after, "a request changed something outside the share"


_FS: list = []


def fs_device():
    """A real virtio-fs device over a temporary share (and a folder next to it)."""
    if not _FS:
        from vmctl.virtio.fs import FsDevice
        work = tempfile.mkdtemp(prefix="vmctl-fuzz-fs-")
        _WORK.append(work)
        root, outside = _fuse_root(work)
        _FS.append((FsDevice(root, "fuzz"), outside))
    return _FS[0]


@SETTINGS
@given(r=ring, request=fuse_request, hiprio=st.booleans())
def fs(r, request, hiprio):
    """virtio-fs: the rings carrying FUSE requests (READ/WRITE take the zero-copy path into
    guest memory): only `DeviceError`/`QueueError`, replies within the writable part."""
    device, outside = fs_device()
    before = _tree(outside)
    memory().write(0x10000, _fuse_bytes(*request))
    sink = _Sink()
    try:
        device.process(0 if hiprio else 1, build_queue(r), QueueContext(memory(), sink))
    except (QueueError, DeviceError):
        pass
    assert _tree(outside) == before


# --- the OCI importer: layer tars and image documents --------------------------------------

PATHS = ["a", "d", "d/f", "d/e/f", "dev/null", "dev/x", "l", "l/f", "h", "/abs", "../up",
         "d/../../up", ".", "./d/g", "d/.wh.f", ".wh..wh..opq", "d/.wh..wh..opq", ".wh.",
         ".wh...", "d/.wh..wh.x", "x" * 300, "\udcff", "d//f", "lib/ld", "etc/passwd"]
LINKS = ["d", "/", "/etc", "..", "../..", "d/f", "a", "l/f", "", "lib/ld", "/lib/ld"]
layer_entry = st.tuples(
    st.sampled_from(["dir", "file", "symlink", "hardlink", "device", "block", "fifo",
                     "whiteout", "opaque", "raw"]),
    st.sampled_from(PATHS) | st.text(max_size=8), st.sampled_from(LINKS) | st.text(max_size=6),
    st.sampled_from([0, 0o755, 0o4755, 0o7777, 0o1777]), st.integers(0, 3),
    st.sampled_from([{}, {"user.a": "b"}, {"trusted.overlay.opaque": "y"},
                     {"security.capability": "\x01"}, {"user.\udcff": "x"}]))


def _layer_tar(entries: list) -> bytes:
    from vmctl.oci.write import Layer
    layer = Layer()
    for kind, name, link, mode, number, xattrs in entries:
        if kind == "dir":
            layer.dir(name, mode, xattrs=xattrs)
        elif kind == "file":
            layer.file(name, b"z" * number * 100, mode, xattrs=xattrs, uid=number * 500)
        elif kind == "symlink":
            layer.symlink(name, link)
        elif kind == "hardlink":
            layer.hardlink(name, link)
        elif kind in ("device", "block"):
            layer.device(name, number, number // 2, block=kind == "block")
        elif kind == "fifo":
            layer.fifo(name)
        elif kind == "whiteout":
            layer.whiteout(name)
        elif kind == "opaque":
            layer.opaque(name)
        else:
            layer._add(name, b"7KVX"[number:number + 1], mode)  # contiguous, unknown types
    try:
        return layer.tar()
    except (ValueError, UnicodeError, tarfile.TarError):
        return Layer().file("ok", b"ok").tar()  # not writable as a tar: the plainest layer


@SETTINGS
@given(entries=st.lists(layer_entry, max_size=10), lower=st.lists(layer_entry, max_size=4),
       mutations=st.lists(st.tuples(st.integers(0, 1 << 14), st.binary(min_size=1, max_size=4)),
                          max_size=3),
       gzipped=st.booleans(), cut=st.integers(0, 3), right_diff_id=st.booleans())
def oci_layer(entries, lower, mutations, gzipped, cut, right_diff_id):
    """A layer tar of hostile entries (names leaving the root, writes through symlinks, hard
    links out, devices, whiteouts, trusted xattrs), then byte mutations or a cut, unpacked
    over a lower layer: only a one-line `VmctlError`, nothing outside the layer written."""
    import gzip

    from vmctl.oci import digest as dg
    from vmctl.oci.unpack import unpack
    tar = bytearray(_layer_tar(entries))
    for offset, blob in mutations:
        offset %= len(tar)
        tar[offset:offset + len(blob)] = blob[: len(tar) - offset]
    if cut:
        tar = tar[: len(tar) * cut // 4]
    blob = gzip.compress(bytes(tar), mtime=0) if gzipped else bytes(tar)
    diff_id = dg.of_bytes(bytes(tar)) if right_diff_id else "sha256:" + "0" * 64
    with tempfile.TemporaryDirectory(prefix="vmctl-fuzz-oci-") as work:
        base, dest, outside = (Path(work, name) for name in ("lower", "layer", "outside"))
        outside.mkdir()
        (outside / "keep").write_text("keep")
        lower_tar = _layer_tar(lower)
        try:
            unpack(io.BytesIO(lower_tar), "tar", base, dg.of_bytes(lower_tar), "lower")
        except VmctlError:
            base.mkdir(exist_ok=True)
        dest.mkdir()
        siblings = sorted(os.listdir(work))
        try:
            unpack(io.BytesIO(blob), "gzip" if gzipped else "tar", dest, diff_id, "fuzz.tar",
                   lowers=[base], budget=1 << 20)
        except VmctlError as error:
            assert "\n" not in str(error) and str(error).startswith("fuzz.tar"), str(error)
        assert sorted(os.listdir(work)) == siblings, "a layer entry landed next to the layer"
        assert os.listdir(outside) == ["keep"] and (outside / "keep").read_text() == "keep"
        for dirpath, _, filenames in os.walk(dest):
            for name in filenames:
                path = os.path.join(dirpath, name)
                assert os.path.realpath(os.path.dirname(path)).startswith(str(dest)), path


_IMAGES: list[bytes] = []


def oci_archives() -> list[bytes]:
    """Two small images as files: an OCI archive (gzip layers) and a docker-save archive."""
    if not _IMAGES:
        with tempfile.TemporaryDirectory(prefix="vmctl-fuzz-img-") as work:
            _IMAGES.extend(_build_archives(work))
    return _IMAGES


def _build_archives(work: str) -> list[bytes]:
    from vmctl.oci.store import ImageStore
    from vmctl.oci.write import Layer, export_docker, tar_directory, write_layout
    layers = [Layer().dir("etc").file("etc/a", "a\n").symlink("b", "etc/a").tar(),
              Layer().dir("etc").whiteout("etc/a").file("c", "c", mode=0o4755).tar()]
    write_layout(Path(work, "layout"), layers, cmd=["/b"], env=["A=1"])
    tar_directory(Path(work, "layout"), Path(work, "oci.tar"))
    store = ImageStore(Path(work, "store"))
    store.import_image(Path(work, "oci.tar"), "seed")
    export_docker(store, "seed", Path(work, "docker.tar"))
    return [Path(work, "oci.tar").read_bytes(), Path(work, "docker.tar").read_bytes()]


JSON_VALUES = [None, -1, 0, 1 << 64, 1e308, "", "x", "sha256:" + "0" * 64, "../../etc/passwd",
               "/etc/passwd", [], [None], {}, {"os": "linux"}, True, "\udcff"]


@SETTINGS
@given(which=st.integers(0, 1), mutations=st.lists(st.tuples(
    st.integers(0, 1 << 20), st.binary(min_size=1, max_size=4)), max_size=4),
    edits=st.lists(st.tuples(st.integers(0, 1 << 10), st.sampled_from(JSON_VALUES)), max_size=3),
    cut=st.integers(0, 4))
def oci_image(which, mutations, edits, cut):
    """`vmctl image import` of a damaged OCI or docker-save archive (JSON values replaced in
    index/manifest/config, bytes flipped, the file cut): a one-line `VmctlError` or a clean
    import, and a failed import leaves nothing in the store (only its lock)."""
    import json as _json

    from vmctl.oci.store import ImageStore
    data = bytearray(oci_archives()[which])
    if edits:  # replace a value inside one JSON document, kept the same length when it fits
        starts = [i for i in range(len(data) - 1) if data[i:i + 2] == b'{"']
        for position, value in edits:
            start = starts[position % len(starts)]
            end = data.find(b"\0", start)
            try:
                document = _json.loads(bytes(data[start:end]))
            except ValueError:
                continue
            keys = list(document) if isinstance(document, dict) else []
            if keys:
                document[keys[position % len(keys)]] = value
                text = _json.dumps(document).encode()[: end - start]
                data[start:end] = text.ljust(end - start, b" ")
    for offset, blob in mutations:
        offset %= len(data)
        data[offset:offset + len(blob)] = blob[: len(data) - offset]
    if cut:
        data = data[: len(data) * cut // 5]
    with tempfile.TemporaryDirectory(prefix="vmctl-fuzz-imp-") as work:
        archive = Path(work, "image.tar")
        archive.write_bytes(data)
        store = ImageStore(Path(work, "store"))
        try:
            store.import_image(archive, "fuzz")
        except VmctlError as error:
            assert "\n" not in str(error), str(error)
            left = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*")
                          if not p.is_dir())
            assert left in ([], [".lock"]), left


LAYOUT_KEYS = ["schemaVersion", "mediaType", "manifests", "config", "layers", "digest", "size",
               "platform", "os", "architecture", "annotations", "rootfs", "diff_ids", "type",
               "Env", "Cmd", "Entrypoint", "WorkingDir", "User", "org.opencontainers.image.ref.name"]
LAYOUT_VALUES = JSON_VALUES + ["application/vnd.oci.image.index.v1+json",
                               "application/vnd.oci.image.manifest.v1+json",
                               "application/vnd.oci.image.layer.v1.tar+zstd", "layers",
                               {"os": "linux", "architecture": "arm64"}, ["A=1", 2], "sha256:xyz"]
layout_edit = st.tuples(st.sampled_from(["index", "manifest", "config", "descriptor", "layer"]),
                        st.sampled_from(LAYOUT_KEYS), st.sampled_from(LAYOUT_VALUES),
                        st.booleans())  # delete the key instead


@SETTINGS
@given(edits=st.lists(layout_edit, min_size=1, max_size=4), nest=st.sampled_from([0, 0, 0, 1, 2, 3, 5]),
       stale=st.sampled_from([None, "config", "manifest", "layer"]))
def oci_layout(edits, nest, stale):
    """`vmctl image import` of an OCI layout directory whose index, manifest, config and
    descriptors were edited and then *re-digested* (so the import gets past the digest
    checks into the documents' own), nested in up to 5 indexes, sometimes with one stale
    digest: a one-line `VmctlError` or a clean import, nothing left in the store on failure."""
    import hashlib
    import json as _json

    from vmctl.oci.store import ImageStore
    from vmctl.oci.write import Layer
    layer = Layer().dir("etc").file("etc/a", "a\n").tar()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    docs = {"config": {"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"], "Cmd": ["/a"]},
                       "rootfs": {"type": "layers", "diff_ids": [diff_id]}},
            "manifest": {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"},
            "index": {"schemaVersion": 2, "manifests": []},
            "descriptor": {"mediaType": "application/vnd.oci.image.manifest.v1+json"},
            "layer": {"mediaType": "application/vnd.oci.image.layer.v1.tar"}}
    for where, key, value, delete in edits:
        if delete:
            docs[where].pop(key, None)
        else:
            docs[where][key] = value
    with tempfile.TemporaryDirectory(prefix="vmctl-fuzz-layout-") as work:
        root = Path(work, "layout")
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

        def put(data: bytes, kind: str) -> dict:
            digest = hashlib.sha256(data).hexdigest()
            (root / "blobs" / "sha256" / digest).write_bytes(data)
            if stale == kind:
                digest = hashlib.sha256(data + b" ").hexdigest()
            return {"digest": f"sha256:{digest}", "size": len(data)}

        def dumps(document) -> bytes:
            return _json.dumps(document).encode("utf-8", "surrogatepass")

        manifest = {**docs["manifest"]}
        manifest.setdefault("config", {"mediaType": "application/vnd.oci.image.config.v1+json",
                                       **put(dumps(docs["config"]), "config")})
        manifest.setdefault("layers", [{**put(layer, "layer"), **docs["layer"]}])
        descriptor = {**put(dumps(manifest), "manifest"), **docs["descriptor"]}
        for _ in range(nest):
            nested = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                      "manifests": [descriptor]}
            descriptor = {"mediaType": "application/vnd.oci.image.index.v1+json", **put(dumps(nested), "index")}
        index = {**docs["index"]}
        if index.get("manifests") == []:
            index["manifests"] = [descriptor]
        (root / "index.json").write_bytes(dumps(index))
        store = ImageStore(Path(work, "store"))
        try:
            store.import_image(root, "fuzz")
        except VmctlError as error:
            assert "\n" not in str(error), str(error)
            left = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*")
                          if not p.is_dir())
            assert left in ([], [".lock"]), left


def cleanup() -> None:
    """Close the devices the targets opened and remove their folders."""
    import shutil

    for device in _BLK:
        device.close()
    for device, _ in _FS:
        device.close()
    for device in _PMEM:
        device.close()
    for device, client in _CONSOLE:
        client.close()
        device.close()
    for sock in _SENDER:
        sock.close()
    for device in _NET:
        device.close()
    _BLK.clear(), _FS.clear(), _PMEM.clear(), _CONSOLE.clear(), _NET.clear(), _SENDER.clear()
    for work in _WORK:
        shutil.rmtree(work, ignore_errors=True)
    _WORK.clear()


TARGETS = {"qcow2": qcow2, "virtqueue": virtqueue, "blk": blk, "rng": rng, "net": net, "net_rx": net_rx,
           "console": console, "pmem": pmem, "spec": spec, "fuse": fuse, "fs": fs, "oci_layer": oci_layer,
           "oci_image": oci_image, "oci_layout": oci_layout}
