"""Hostile qcow2 images: every malformation gives a one-line DiskError naming the file, the
field and the byte offset; never a hang, a MemoryError, or a write. Plus a hypothesis
fuzzer over QEMU-made seed images."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmctl.disk import DiskError, DiskFormatError, ImageCorruptError, UnsupportedFeatureError, open_disk
from vmctl.disk.qcow2 import Qcow2Image
from vmctl.disk.qcow2.check import check
from vmctl.disk.qcow2.create import create, create_overlay
from vmctl.disk.qcow2.ops import map_image

MiB = 1 << 20
HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


def patch(path, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(struct.pack(fmt, *values))


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "victim.qcow2"
    create(str(path), 64 * MiB)
    with open_disk(str(path)) as disk:
        disk.pwrite(0, b"\1" * 100000)
    return path


def refuse(path, field: str, offset: int | None = None, error=DiskFormatError) -> str:
    """Both read-only and read-write opens (plus a read) fail the same way; no byte changes."""
    before = digest(path)
    for read_only in (True, False):
        with pytest.raises(error) as caught:
            with open_disk(str(path), read_only=read_only) as disk:
                disk.read(0, min(disk.size, 4 * MiB))
        message = str(caught.value)
        assert str(path) in message and field in message and "\n" not in message
        if offset is not None:
            assert f"{offset:#x}" in message
    assert digest(path) == before
    return message


@pytest.mark.parametrize("offset,fmt,value,field", [
    (0, ">4s", b"QFI\xfb", None),  # sanity: a valid image is accepted (skipped below)
    (4, ">I", 4, "version"),
    (20, ">I", 30, "cluster_bits"),
    (20, ">I", 8, "cluster_bits"),
    (24, ">Q", 1 << 63, "size"),
    (36, ">I", 1 << 30, "l1_size"),
    (36, ">I", 0, "l1_size"),
    (40, ">Q", 0x30001, "l1_table_offset"),
    (40, ">Q", 1 << 50, "l1_table_offset"),
    (40, ">Q", 0x10000, "l1_table_offset"),  # on top of the refcount table
    (40, ">Q", 0, "l1_table_offset"),  # on top of the header
    (48, ">Q", 1 << 45, "refcount_table_offset"),
    (48, ">Q", 0x123, "refcount_table_offset"),
    (56, ">I", 1 << 30, "refcount_table_clusters"),
    (56, ">I", 0, "refcount_table_clusters"),
    (60, ">I", 1 << 30, "nb_snapshots"),
    (72, ">Q", 1 << 40, "incompatible_features"),
    (72, ">Q", 1 << 4, "incompatible_features"),
    (96, ">I", 7, "refcount_order"),
    (100, ">I", 1 << 31, "header_length"),
    (100, ">I", 101, "header_length"),
    (32, ">I", 1, "crypt_method"),
    (104, ">B", 1, "compression_type"),
])
def test_bad_header_fields_are_named_with_their_offset(image, offset, fmt, value, field):
    patch(image, offset, fmt, value)
    if field is None:
        with open_disk(str(image), read_only=True) as disk:
            assert disk.read(0, 4) == b"\1" * 4
        return
    refuse(image, field, offset)


def test_unknown_incompatible_bit_names_the_feature(image):
    patch(image, 72, ">Q", 1 << 9)
    message = refuse(image, "incompatible_features", 72, UnsupportedFeatureError)
    assert "bit 9" in message


def test_bad_table_entries(image, tmp_path):
    cases = {
        "l1-unaligned": (0x30000, ">Q", (1 << 63) | 0x40200),
        "l1-past-eof": (0x30000, ">Q", (1 << 63) | (1 << 40)),
        "l1-points-at-reftable": (0x30000, ">Q", (1 << 63) | 0x10000),
        "l2-data-on-l1-table": (0x40000, ">Q", (1 << 63) | 0x30000),
        "l2-data-past-eof": (0x40000, ">Q", (1 << 63) | (1 << 44)),
        "l2-data-unaligned": (0x40000, ">Q", (1 << 63) | 0x50200),
        "reftable-past-eof": (0x10000, ">Q", 1 << 44),
    }
    for name, (offset, fmt, value) in cases.items():
        path = tmp_path / f"{name}.qcow2"
        shutil.copy(image, path)
        patch(path, offset, fmt, value)
        before = path.read_bytes()
        with pytest.raises(DiskFormatError, match=".") as caught:
            with open_disk(str(path)) as disk:  # read-write: must fail before any write
                disk.pwrite(0, b"x")
        assert f"{offset:#x}" in str(caught.value) or "entry" in str(caught.value), name
        after = path.read_bytes()
        # as QEMU: nothing written but the corrupt bit (incompatible_features, byte 72)
        assert after[:72] + after[80:] == before[:72] + before[80:], name
        assert struct.unpack_from(">Q", after, 72)[0] == 2, name
        with pytest.raises(ImageCorruptError, match="corrupt"):
            open_disk(str(path), read_only=False)
        report = check(str(path))
        assert report.corruptions >= 1, name


def test_backing_chain_loop_and_depth(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(str(a), MiB)
    create_overlay(str(a), str(b))
    # point a at b: a -> b -> a
    header = Qcow2Image(str(a), read_only=False, open_backing=False)
    header.header.backing_file, header.header.backing_format = "b.qcow2", "qcow2"
    header.write_header()
    header.close()
    with pytest.raises(DiskFormatError, match="loops"):
        open_disk(str(b), read_only=True)
    chain = [tmp_path / "c0.qcow2"]
    create(str(chain[0]), MiB)
    for n in range(1, 40):
        chain.append(tmp_path / f"c{n}.qcow2")
        create_overlay(str(chain[n - 1]), str(chain[n]))
    with pytest.raises(DiskFormatError, match="deeper"):
        open_disk(str(chain[-1]), read_only=True)
    with open_disk(str(chain[20]), read_only=True) as disk:
        assert disk.read(0, 8) == bytes(8)
    missing = tmp_path / "orphan.qcow2"
    create_overlay(str(chain[0]), str(missing))
    os.unlink(chain[0])
    with pytest.raises(DiskFormatError, match="not found"):
        open_disk(str(missing), read_only=True)


def test_corrupt_compressed_cluster(tmp_path):
    if not HAVE_QEMU:
        pytest.skip("qemu-img not installed (Debian package qemu-utils)")
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(range(256)) * 1024)  # compressible
    path = tmp_path / "c.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(path)], check=True)
    image = Qcow2Image(str(path))
    _, entry = image.classify(0)
    coffset, _ = image.compressed_range(entry)
    image.close()
    patch(path, coffset, ">16s", b"\xff" * 16)
    with open_disk(str(path), read_only=True) as disk:
        with pytest.raises(DiskFormatError, match="deflate|decompresses"):
            disk.read(0, 512)


def test_absurd_snapshot_references_do_not_hang_check(image):
    # 65536 snapshots all pointing at the active L1 table
    with open(image, "r+b") as file:
        end = file.seek(0, os.SEEK_END)
        aligned = -(-end // 65536) * 65536
        file.truncate(aligned)
        file.seek(aligned)
        entry = struct.pack(">QIHHIIQII", 0x30000, 1, 0, 0, 0, 0, 0, 0, 0)
        file.write(entry * 20000)
    patch(image, 60, ">IQ", 20000, aligned)
    with pytest.raises(DiskError):
        check(str(image))


SEEDS: list[bytes] = []


def _seed_images(tmp_path_factory) -> list[bytes]:
    if SEEDS:
        return SEEDS
    root = tmp_path_factory.mktemp("seeds")
    specs = [("v3-4k", ["-o", "cluster_size=4096"]), ("v2-512", ["-o", "compat=0.10,cluster_size=512"]),
             ("v3-refbits1", ["-o", "cluster_size=1024,refcount_bits=1"])]
    for name, opts in specs:
        path = root / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), "1M"],
                       check=True)
        subprocess.run(["qemu-io", "-c", "write -P 3 0 20k", "-c", "write -z 200k 8k",
                        "-c", "write -P 9 600k 3k", str(path)], check=True, capture_output=True)
        SEEDS.append(path.read_bytes())
    raw = root / "r.raw"
    raw.write_bytes(os.urandom(4096) * 8 + bytes(4096 * 8))
    compressed = root / "c.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096",
                    str(raw), str(compressed)], check=True)
    SEEDS.append(compressed.read_bytes())
    return SEEDS


@pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img not installed (Debian package qemu-utils)")
@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 3), mutations=st.lists(
    st.tuples(st.integers(0, 16383), st.binary(min_size=1, max_size=8)), min_size=1,
    max_size=6))
def test_fuzz_parsers_only_raise_disk_errors(tmp_path_factory, tmp_path, seed, mutations):
    data = bytearray(_seed_images(tmp_path_factory)[seed])
    for offset, blob in mutations:
        offset %= len(data)
        data[offset:offset + len(blob)] = blob[: len(data) - offset]
    path = tmp_path / "fuzz.qcow2"
    path.write_bytes(bytes(data))
    try:
        with Qcow2Image(str(path), read_only=True) as disk:
            for offset in (0, disk.size // 2, max(disk.size - 65536, 0)):
                length = min(65536, disk.size - offset)
                if length > 0:
                    disk.read(offset, length)
            if disk.size <= 1 << 30:
                map_image(str(path))
    except DiskError:
        pass
    try:
        check(str(path))
    except DiskError:
        pass
    # A writable open may itself update the header as QEMU does (unknown autoclear bits
    # cleared, a dirty image's refcounts rebuilt): a refused write is compared with that.
    before = bytes(data)
    try:
        with Qcow2Image(str(path), read_only=False) as disk:
            before = path.read_bytes()
            disk.pwrite(0, b"fuzz")
            disk.flush()
    except ImageCorruptError:
        # refused as QEMU does: nothing written but the corrupt bit
        after = path.read_bytes()
        assert after[:72] + after[80:] == before[:72] + before[80:]
    except DiskError:
        # refused: nothing may have been written
        assert path.read_bytes() == before
