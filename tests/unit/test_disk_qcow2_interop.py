"""qcow2 against the real qemu-img / qemu-io: images we write pass `qemu-img check` and
compare equal to what QEMU produces for the same writes; images QEMU writes read correctly."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess

import pytest

from vmctl.cli import main
from vmctl.disk import open_disk
from vmctl.disk.qcow2 import Qcow2Image
from vmctl.disk.qcow2.check import check
from vmctl.disk.qcow2.create import CreateOptions, create, create_overlay
from vmctl.disk.qcow2.ops import commit, convert, info, map_image, rebase

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io not installed (Debian package qemu-utils)",
)
MiB = 1 << 20


def qemu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True)


def qemu_check(path) -> dict:
    result = qemu("qemu-img", "check", "--output=json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def identical(a, b) -> bool:
    result = qemu("qemu-img", "compare", str(a), str(b))
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def qemu_io(path, commands: list[str], fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    result = qemu(*args, str(path))
    assert result.returncode == 0 and "error" not in result.stdout.lower(), result.stdout


def random_ops(rng: random.Random, size: int, count: int, discard: bool) -> list[tuple]:
    ops = []
    for _ in range(count):
        kind = rng.choice(["write"] * 6 + ["zero"] + (["discard"] if discard else []))
        offset = rng.randrange(0, size // 512) * 512
        length = min(rng.choice([512, 4096, 65536, 200 * 512, 3 * 65536 + 1024]), size - offset)
        ops.append((kind, offset, length, rng.randrange(1, 255)))
    return ops


def apply_ours(disk, ops, model: bytearray) -> None:
    for kind, offset, length, pattern in ops:
        if kind == "write":
            disk.pwrite(offset, bytes([pattern]) * length)
            model[offset:offset + length] = bytes([pattern]) * length
        elif kind == "zero":
            disk.write_zeroes(offset, length)
            model[offset:offset + length] = bytes(length)
        else:
            disk.discard(offset, length)
            # discard only changes whole clusters; they then read as zeros (v3)
            cs = disk.cluster_size
            start, end = -(-offset // cs) * cs, (offset + length) // cs * cs
            if offset + length == disk.size:
                end = offset + length
            if end > start:
                model[start:end] = bytes(end - start)


def as_qemu_io(ops) -> list[str]:
    out = []
    for kind, offset, length, pattern in ops:
        out.append({"write": f"write -P {pattern} {offset} {length}",
                    "zero": f"write -z {offset} {length}",
                    "discard": f"discard {offset} {length}"}[kind])
    return out


@pytest.mark.parametrize("size,cluster,version,refbits", [
    (1 << 30, 65536, 3, 16), (100 * MiB, 4096, 3, 16), (1 << 30, 65536, 2, 16),
    (1 << 30, 65536, 3, 1), (1 << 30, 65536, 3, 64), (5 << 30, 2 * MiB, 3, 8), (0, 65536, 3, 16),
])
def test_create_is_byte_identical_to_qemu_img(tmp_path, size, cluster, version, refbits):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    create(str(ours), size, CreateOptions(cluster, version, refbits))
    compat = "1.1" if version == 3 else "0.10"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={cluster},compat={compat},refcount_bits={refbits}",
                    str(theirs), str(size)], check=True)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("size,cluster", [(12345, 512), (1 << 30, 512), (10 << 30, 512)])
def test_create_odd_layouts_pass_qemu_check(tmp_path, size, cluster):
    path = tmp_path / "a.qcow2"
    create(str(path), size, CreateOptions(cluster))
    assert qemu_check(path)["check-errors"] == 0
    assert json.loads(qemu("qemu-img", "info", "--output=json", str(path)).stdout)[
        "virtual-size"] == -(-size // 512) * 512  # rounded up to sectors, like qemu-img


@pytest.mark.parametrize("cluster,version,base_format", [
    (65536, 3, "qcow2"), (4096, 3, "raw"), (65536, 2, "qcow2"), (512, 3, "qcow2"),
    (2 * MiB, 3, "raw"),
])
def test_overlay_writes_match_qemu(tmp_path, cluster, version, base_format):
    size = 8 * MiB
    rng = random.Random(cluster + version)
    base = tmp_path / f"base.{base_format}"
    if base_format == "raw":
        base.write_bytes(bytes(size))
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)],
                       check=True)
    base_ops = [("write", o, 65536, p) for o, p in ((0, 11), (MiB, 12), (3 * MiB + 512, 13))]
    qemu_io(base, as_qemu_io(base_ops), base_format)
    model = bytearray(open_disk(str(base), read_only=True).read(0, size))

    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    options = CreateOptions(cluster, version)
    create_overlay(str(base), str(ours), options=options)
    compat = "1.1" if version == 3 else "0.10"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F",
                    base_format, "-o", f"cluster_size={cluster},compat={compat}",
                    str(theirs)], check=True)
    ops = random_ops(rng, size, 120, discard=version == 3)
    with open_disk(str(ours)) as disk:
        apply_ours(disk, ops, model)
        assert disk.read(0, size) == bytes(model)
    for start in range(0, len(ops), 40):
        qemu_io(theirs, as_qemu_io(ops[start:start + 40]))
    assert qemu_check(ours)["check-errors"] == 0
    assert "leaks" not in qemu_check(ours) and "corruptions" not in qemu_check(ours)
    assert identical(ours, theirs)
    reference = tmp_path / "model.raw"
    reference.write_bytes(bytes(model))
    assert identical(ours, reference)
    assert check(str(ours)).clean


def test_reads_qemu_images_compressed_v2_small_clusters_and_deep_chain(tmp_path):
    size = 4 * MiB
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(5).randbytes(size // 2) + bytes(size // 2))
    chain = [raw]
    for depth in range(4):  # raw <- q0 <- q1 <- q2 <- q3, each writing a little
        layer = tmp_path / f"q{depth}.qcow2"
        fmt = "raw" if depth == 0 else "qcow2"
        opts = ["-o", "compat=0.10"] if depth == 1 else ["-o", "cluster_size=512"] \
            if depth == 2 else []
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, "-b",
                        chain[-1].name, "-F", fmt, str(layer)], check=True)
        qemu_io(layer, [f"write -P {depth + 40} {depth * 300000 + 777} 100000",
                        f"write -z {3 * MiB + depth * 4096} 70000"])
        chain.append(layer)
    top = chain[-1]
    expected = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(expected)], check=True)
    with open_disk(str(top), read_only=True) as disk:
        assert disk.read(0, size) == expected.read_bytes()
    compressed = tmp_path / "compressed.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(top), str(compressed)],
                   check=True)
    assert check(str(compressed)).compressed_clusters > 0
    with open_disk(str(compressed), read_only=True) as disk:
        assert disk.read(0, size) == expected.read_bytes()
        disk_rw = None
    # writing over compressed clusters copies them out (partial cluster COW)
    with open_disk(str(compressed)) as disk_rw:
        disk_rw.pwrite(1000, b"X" * 3000)
    data = bytearray(expected.read_bytes())
    data[1000:4000] = b"X" * 3000
    expected.write_bytes(bytes(data))
    assert qemu_check(compressed)["check-errors"] == 0
    assert "leaks" not in qemu_check(compressed)
    assert identical(compressed, expected)


def test_map_info_and_check_report_what_qemu_reports(tmp_path):
    base = tmp_path / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"], check=True)
    qemu_io(base, ["write -P 1 0 128k", "write -P 2 1M 64k", "write -z 2M 64k"])
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\1" * 65536 + bytes(4 * MiB - 65536))
    for backing, fmt in ((base, "qcow2"), (raw, "raw")):
        top = tmp_path / f"top-{fmt}.qcow2"
        create_overlay(str(backing), str(top))
        with open_disk(str(top)) as disk:
            disk.pwrite(65536, b"\3" * 65536)
            disk.write_zeroes(MiB, 65536)
            disk.pwrite(3 * MiB, b"\4" * 4096)
        theirs = json.loads(qemu("qemu-img", "map", "--output=json", str(top)).stdout)
        assert map_image(str(top)) == theirs
        their_info = json.loads(qemu("qemu-img", "info", "--output=json", str(top)).stdout)
        assert info(str(top)) == their_info
        ours = check(str(top)).as_dict()
        assert ours == qemu_check(top) | {"fragmented-clusters": ours.get(
            "fragmented-clusters", 0)} if "fragmented-clusters" in ours else qemu_check(top)


def test_commit_rebase_convert(tmp_path):
    size = 4 * MiB
    base = tmp_path / "base.qcow2"
    create(str(base), size)
    with open_disk(str(base)) as disk:
        disk.pwrite(0, b"\1" * (2 * MiB))
    top = tmp_path / "top.qcow2"
    create_overlay(str(base), str(top))
    with open_disk(str(top)) as disk:
        disk.pwrite(100, b"\2" * 70000)
        disk.write_zeroes(MiB, 65536)
    before = tmp_path / "before.raw"
    convert(str(top), str(before), "raw")
    assert identical(before, top)

    # rebase onto an empty base: clusters that differ are copied in first
    other = tmp_path / "other.qcow2"
    create(str(other), size)
    assert rebase(str(top), str(other)) > 0
    assert json.loads(qemu("qemu-img", "info", "--output=json", str(top)).stdout)[
        "backing-filename"] == "other.qcow2"
    assert identical(top, before)
    assert qemu_check(top)["check-errors"] == 0

    # commit into the new base, overlay emptied, content unchanged
    commit(str(top))
    assert identical(other, before)
    assert identical(top, before)
    assert all(e["depth"] > 0 or not e["present"] for e in map_image(str(top)))
    assert qemu_check(other)["check-errors"] == 0

    # unsafe rebase only rewrites the header; qcow2 -> qcow2 convert flattens
    moved = tmp_path / "moved.qcow2"
    os.rename(other, moved)
    rebase(str(top), str(moved), unsafe=True)
    assert identical(top, before)
    flat = tmp_path / "flat.qcow2"
    convert(str(top), str(flat), "qcow2")
    assert "backing-filename" not in info(str(flat))
    assert identical(flat, before)
    assert qemu_check(flat)["check-errors"] == 0


def test_refcount_table_growth_and_small_l2_cache(tmp_path):
    """512-byte clusters: one refcount block covers 128 KiB and the first refcount table
    8 MiB, so 10 MiB of scattered writes need new blocks and a moved, bigger table; a tiny
    L2 cache forces dirty-table eviction (an ordered flush) mid-write."""
    path = tmp_path / "small.qcow2"
    size = 64 * MiB
    create(str(path), size, CreateOptions(512))
    model = bytearray(size)
    rng = random.Random(9)
    image = Qcow2Image(str(path), read_only=False, l2_cache_bytes=8 * 512)
    with image:
        for n in range(1300):
            offset = rng.randrange(0, size - 20000)
            data = rng.randbytes(rng.randrange(1, 20000))
            image.pwrite(offset, data)
            model[offset:offset + len(data)] = data
            if n % 100 == 0:
                at = rng.randrange(0, size // 512) * 512
                image.discard(at, 4096)
                model[at:at + 4096] = bytes(4096)
                image.flush()
        for offset in range(0, size, 4 * MiB):
            assert image.read(offset, 4 * MiB) == bytes(model[offset:offset + 4 * MiB])
    header = open(path, "rb").read(64)
    assert struct.unpack_from(">I", header, 56)[0] > 1  # the refcount table grew
    result = qemu_check(path)
    assert result["check-errors"] == 0 and "leaks" not in result and "corruptions" not in result
    assert check(str(path)).clean


def test_check_finds_and_repairs_leaks_like_qemu(tmp_path):
    path = tmp_path / "leaky.qcow2"
    create(str(path), 16 * MiB)
    with open_disk(str(path)) as disk:
        disk.pwrite(0, b"\5" * 200000)
    # grow the file and mark two unused clusters in use in the first refcount block
    with open(path, "r+b") as file:
        file.truncate(20 * 65536)
        file.seek(2 * 65536 + 2 * 15)
        file.write(struct.pack(">HH", 1, 1))
    theirs = qemu("qemu-img", "check", "--output=json", str(path))
    assert theirs.returncode == 3 and json.loads(theirs.stdout)["leaks"] == 2
    assert check(str(path)).leaks == 2
    assert main(["image", "check", str(path)]) == 3
    assert main(["image", "check", "--repair", str(path)]) == 0
    assert "leaks" not in qemu_check(path)
    # a used cluster with refcount 0 is a corruption for both tools
    with open(path, "r+b") as file:
        file.seek(2 * 65536 + 2 * 4)
        file.write(struct.pack(">H", 0))
    assert qemu("qemu-img", "check", str(path)).returncode == 2
    assert check(str(path)).corruptions >= 1
    assert main(["image", "check", str(path)]) == 2


def test_dirty_bit_is_repaired_on_read_write_open(tmp_path):
    path = tmp_path / "dirty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on",
                    str(path), "8M"], check=True)
    qemu_io(path, ["write -P 7 0 256k"])
    with open(path, "r+b") as file:  # a crashed lazy-refcounts writer: dirty + stale counts
        file.seek(72)
        file.write(struct.pack(">Q", 1))
        file.seek(2 * 65536 + 2 * 4)
        file.write(struct.pack(">H", 0))
    assert info(str(path))["dirty-flag"] is True
    with open_disk(str(path)) as disk:
        assert disk.read(0, 4) == b"\7" * 4
    assert info(str(path))["dirty-flag"] is False
    result = qemu_check(path)
    assert "corruptions" not in result and "leaks" not in result
