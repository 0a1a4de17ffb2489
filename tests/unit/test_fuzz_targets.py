"""Every fuzz target (tests/fuzz/targets.py) for a few seconds, plus regression tests for
what fuzzing found. Long runs: scripts/fuzz TARGET SECONDS."""

from __future__ import annotations

import io
import os
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "fuzz"))

from run import fuzz  # noqa: E402
from targets import TARGETS, cleanup  # noqa: E402

from vmctl.spec import parse_spec  # noqa: E402
from vmctl.spec.parse import SpecError  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _devices_closed_after():
    yield
    cleanup()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_briefly(name):
    if name in ("net", "net_rx") and os.geteuid() != 0:
        pytest.skip("the net targets need root for their TAP device")
    if name in ("oci_layer", "oci_image", "oci_layout") and os.geteuid() != 0:
        pytest.skip("unpacking layers needs root")
    result = fuzz(name, 3.0, seed=1)
    assert result["execs"] > 0
    assert result["crashes"] == 0, result


@pytest.mark.parametrize("text", ["name: x\ncpus: !!int x", "name: x\ncpus: !!float 1e999x",
                                  "name: x\nmemory: !!binary '%%'",
                                  "name: x\x17\ncpus: 1"])  # a control character
def test_spec_scalar_with_a_tag_that_cannot_be_read_is_a_spec_error(text):
    """Found by the spec fuzz target: a ValueError/ParserError traceback, not one line."""
    with pytest.raises(SpecError, match="fuzz.yaml"):
        parse_spec(text, source="fuzz.yaml")


# --- found by the fuse, fs, oci_layer and oci_image targets --------------------------------

def _fuse(tmp_path, *requests):
    """Replies of a real FileServer over a share holding `file` (node 2, handle 1)."""
    from targets import _fuse_bytes

    from vmctl.fs import protocol as fp
    from vmctl.fs.server import FileServer
    (tmp_path / "file").write_bytes(b"0123456789")
    server = FileServer(tmp_path, cache="never")  # handle 1 from OPEN
    z = [0] * 16
    try:
        for prologue in [(fp.INIT, 1, [7, 31] + z[2:], [], 0, 0), (fp.LOOKUP, 1, z, [b"file"], 0, 0),
                         (fp.OPEN, 2, [os.O_RDWR] + z[1:], [], 0, 0)]:
            server.handle(_fuse_bytes(*prologue))
        return [server.handle(_fuse_bytes(*request)) for request in requests]
    finally:
        server.close()


def test_fuse_short_forget_is_dropped_not_raised(tmp_path):
    """A FORGET or BATCH_FORGET too short for its arguments raised ProtocolError out of
    FileServer.handle (the virtio-fs high-priority queue's device then failed)."""
    from vmctl.fs import protocol as fp
    replies = _fuse(tmp_path, (fp.FORGET, 2, [0] * 16, [], 0, -5), (fp.BATCH_FORGET, 2, [0] * 16, [], 0, -70))
    assert replies == [None, None]


@pytest.mark.parametrize("opcode,fields", [
    (15, [1, 1 << 63, 10]),  # READ at an offset past off_t
    (16, [1, (1 << 64) - 1, 3]),  # WRITE there
    (4, [8, 0, 0, 1 << 63]),  # SETATTR size past off_t
    (14, [1 << 31]),  # OPEN with flags past a C int
])
def test_fuse_numbers_past_what_the_system_call_takes_are_einval(tmp_path, opcode, fields):
    """An OverflowError traceback before; Linux answers EINVAL for such offsets."""
    from vmctl.fs import protocol as fp
    (reply,) = _fuse(tmp_path, (opcode, 2, fields + [0] * (16 - len(fields)), [], 0, 0))
    length, error, _ = fp.OUT_HEADER.unpack_from(reply)
    assert (length, error) == (fp.OUT_HEADER.size, -22)


def test_virtio_fs_read_at_a_huge_offset_is_einval(tmp_path):
    """The zero-copy READ path of virtio-fs let the OverflowError out of the device."""
    from targets import RAM_A, RAM_B, _fuse_bytes

    from vmctl.fs import protocol as fp
    from vmctl.memory import GuestMemory
    from vmctl.virtio.device import QueueContext
    from vmctl.virtio.fs import FsDevice
    from vmctl.virtio.queue import Virtqueue
    (tmp_path / "file").write_bytes(b"0123456789")
    device = FsDevice(str(tmp_path), "t")
    mem = GuestMemory([RAM_A, RAM_B])
    done = []
    z = [0] * 16
    try:
        for request in [(fp.INIT, 1, [7, 31] + z[2:], [], 0, 0), (fp.LOOKUP, 1, z, [b"file"], 0, 0),
                        (fp.OPEN, 2, [os.O_RDWR] + z[1:], [], 0, 0)]:
            device.server.handle(_fuse_bytes(*request))
        data = _fuse_bytes(fp.READ, 2, [0, 1 << 63, 4096] + z[3:], [], 0, 0)  # `cache: auto`: by node
        mem.write(0x10000, data)
        mem.write(0x1000, struct.pack("<QIHH", 0x10000, len(data), 1, 1)
                  + struct.pack("<QIHH", 0x20000, 4096 + 16, 2, 0))  # readable, then writable
        mem.write(0x2000, struct.pack("<HHH", 0, 1, 0))
        queue = Virtqueue(mem, 16)
        queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = 4, 0x1000, 0x2000, 0x3000
        queue.activate(event_idx=False, indirect=False)
        device.process(1, queue, QueueContext(mem, lambda q, chain, written: done.append(written)))
    finally:
        device.close()
    assert done == [fp.OUT_HEADER.size]
    assert fp.OUT_HEADER.unpack_from(mem.read(0x20000, 16))[1] == -22


@pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root")
@pytest.mark.parametrize("xattrs", [{"security.capability": "\x01"}, {"user." + "a" * 300: "b"}])
def test_layer_directory_xattr_the_kernel_refuses_is_a_one_line_error(tmp_path, xattrs):
    """A directory's xattrs are set after the loop, outside the error handling: the raw
    OSError (EINVAL, ERANGE) was a traceback of `vmctl image import`."""
    from vmctl.errors import VmctlError
    from vmctl.oci import digest as dg
    from vmctl.oci.unpack import unpack
    from vmctl.oci.write import Layer
    tar = Layer().dir("d", xattrs=xattrs).tar()
    with pytest.raises(VmctlError, match=r"^t\.tar: entry 'd': "):
        unpack(io.BytesIO(tar), "tar", tmp_path / "l", dg.of_bytes(tar), "t.tar")


@pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root")
def test_layer_pax_header_charset_that_does_not_decode_is_a_one_line_error(tmp_path):
    """tarfile lets a UnicodeDecodeError out of a pax `hdrcharset` that is not UTF-8."""
    from vmctl.errors import VmctlError
    from vmctl.oci import digest as dg
    from vmctl.oci.unpack import unpack
    from vmctl.oci.write import Layer
    tar = _with_pax_record(Layer().file("f", b"x", xattrs={"user.a": "b"}).tar(),
                           b"21 hdrcharset=\xbf\xbfNARY\n")
    with pytest.raises(VmctlError, match=r"^t\.tar: .*corrupt layer"):
        unpack(io.BytesIO(tar), "tar", tmp_path / "l", dg.of_bytes(tar), "t.tar")


def _with_pax_record(tar: bytes, record: bytes) -> bytes:
    """`tar` with one more record in its first pax header (size field and checksum fixed)."""
    import tarfile
    header = bytearray(tar[:512])
    size = int(header[124:136].rstrip(b"\0 ").decode(), 8)
    body = tar[512:512 + size] + record
    header[124:136] = f"{len(body):011o}\0".encode()
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    padded = body + b"\0" * (-len(body) % 512)
    rest = tar[512 + size + (-size % 512):]
    assert tarfile.BLOCKSIZE == 512
    return bytes(header) + padded + rest


def test_damaged_image_archive_is_one_line(tmp_path):
    """`tarfile.open(..., "r:*")` lists every method it tried on a line of its own: the
    import error was five lines."""
    from vmctl.errors import VmctlError
    from vmctl.oci.store import ImageStore
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"x" * 100 + bytes(1000))
    with pytest.raises(VmctlError) as caught:
        ImageStore(tmp_path / "store").import_image(archive, "x")
    assert "\n" not in str(caught.value) and "not a readable tar archive" in str(caught.value)


def test_layer_descriptor_media_type_that_is_not_a_string_is_one_line(tmp_path):
    """A descriptor whose mediaType is an object made `media not in LAYER_TYPES` a
    TypeError traceback (found by the oci_layout target)."""
    import json

    from vmctl.errors import VmctlError
    from vmctl.oci.store import ImageStore
    from vmctl.oci.write import Layer, write_layout
    root = tmp_path / "layout"
    descriptor = write_layout(root, [Layer().file("a", "a").tar()], gzip_layers=False)
    blob = root / "blobs" / "sha256" / descriptor["digest"].split(":")[1]
    manifest = json.loads(blob.read_text())
    manifest["layers"][0]["mediaType"] = {"os": "linux"}
    data = json.dumps(manifest).encode()
    import hashlib
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    index = json.loads((root / "index.json").read_text())
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(data))
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(VmctlError, match=r"layers\[0\]: mediaType: expected a string"):
        ImageStore(tmp_path / "store").import_image(root, "x")
