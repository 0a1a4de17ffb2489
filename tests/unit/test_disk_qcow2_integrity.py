"""qcow2 integrity: the defects a differential test against qemu-img/qemu-io found (each test
failed before its fix), and QEMU's overlap checks: a write that would land on metadata is
refused, the image marked corrupt, and from then on it only opens read-only.

QEMU's outcome is not copied into the test: each case runs qemu-io / qemu-img on a copy of
the same image and compares."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from vmctl.disk import DiskFormatError, ImageCorruptError, open_disk
from vmctl.disk.qcow2 import Qcow2Image
from vmctl.disk.qcow2.check import check
from vmctl.disk.qcow2.create import CreateOptions, create, create_overlay
from vmctl.disk.qcow2.ops import commit, info, rebase

MiB = 1 << 20
pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io not installed (Debian qemu-utils)")


def poke(path, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(struct.pack(fmt, *values))


def peek(path, offset: int, fmt: str):
    with open(path, "rb") as file:
        file.seek(offset)
        return struct.unpack(fmt, file.read(struct.calcsize(fmt)))[0]


def qemu_io(path, *commands: str) -> subprocess.CompletedProcess:
    args = ["qemu-io"]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args + [str(path)], capture_output=True, text=True)


def qemu_check(path, *extra: str) -> tuple[int, dict]:
    done = subprocess.run(["qemu-img", "check", "--output=json", *extra, str(path)],
                          capture_output=True, text=True)
    try:
        return done.returncode, json.loads(done.stdout)
    except json.JSONDecodeError:
        return done.returncode, {}


def vmctl(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmctl", *args], capture_output=True,
                          text=True, cwd=cwd)


def corrupt_bit(path) -> bool:
    return bool(peek(path, 72, ">Q") & 2)


def qemu_image(path, size="64M", options="compat=1.1", *writes: str) -> None:
    """A 64 KiB-cluster image laid out as iotests expect: refcount table 0x10000, refcount
    block 0x20000, L1 0x30000, first L2 0x40000, first data cluster 0x50000."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(path), size],
                   check=True)
    if writes:
        assert qemu_io(path, *writes).returncode == 0


def both_refuse_write(tmp_path, name: str, write: str = "write -P 0x2a 0 512") -> str:
    """Write through vmctl and (on a copy) through qemu-io; both must refuse and set the
    corrupt bit. Returns vmctl's message."""
    ours = tmp_path / f"{name}.qcow2"
    theirs = tmp_path / f"{name}-qemu.qcow2"
    shutil.copy(ours, theirs)
    _, offset, length = write.split()[-3:] if "-P" in write else write.split()
    with pytest.raises(ImageCorruptError) as caught:
        with open_disk(str(ours), read_only=False) as disk:
            disk.pwrite(int(offset, 0), b"\x2a" * int(length, 0))
            disk.flush()
    qemu = qemu_io(theirs, write)
    assert "failed" in qemu.stdout + qemu.stderr, qemu
    assert corrupt_bit(ours) and corrupt_bit(theirs)
    message = str(caught.value)
    assert str(ours) in message and "\n" not in message and "corrupt" in message
    # from now on: read-write opens are refused with a clear message, read-only works
    with pytest.raises(ImageCorruptError, match="read-only"):
        open_disk(str(ours), read_only=False)
    assert qemu_io(theirs, "read 0 512").returncode != 0 or "corrupt" in \
        qemu_io(theirs, "read 0 512").stderr.lower()
    with open_disk(str(ours), read_only=True) as disk:
        disk.read(0, 512)
    assert vmctl("image", "info", "--json", str(ours)).stdout.count('"corrupt": true') == 1
    return message


# The known defects

def test_v3_header_length_104_survives_a_refcount_table_move(tmp_path):
    """QEMU 1.1-5.0 wrote header_length 104; rewriting such a header failed with a ValueError
    after the in-memory header pointed at the moved table (thousands of refcount errors)."""
    path = tmp_path / "old.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "cluster_size=512,refcount_bits=64", str(path), "16M"], check=True)
    poke(path, 100, ">I", 104)  # bytes 104..112 are zeros: the extension end marker
    pattern = os.urandom(4 * MiB)
    with open_disk(str(path), read_only=False) as disk:
        for at in range(0, len(pattern), 256 * 1024):
            disk.pwrite(at, pattern[at:at + 256 * 1024])
            disk.flush()
    assert peek(path, 48, ">Q") != 512  # the refcount table moved
    assert peek(path, 100, ">I") == 104
    assert check(str(path)).clean
    code, result = qemu_check(path)
    assert code == 0 and "corruptions" not in result and "leaks" not in result
    raw = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], check=True)
    assert raw.read_bytes()[:len(pattern)] == pattern


def test_freed_refcount_table_clusters_are_reused_for_data(tmp_path):
    """After the refcount table moved, its old clusters were freed, reused for data, and still
    taken for "the refcount table" by the overlap check: a valid write refused, an
    acknowledged write lost."""
    path = tmp_path / "small.qcow2"
    create(str(path), 64 * MiB, CreateOptions(512, 3, 64))
    old_table = peek(path, 48, ">Q")
    chunks = {}
    with open_disk(str(path), read_only=False) as disk:
        for n in range(4400):  # one sector each: ~4500 clusters, the table moves and
            chunks[n * 512] = os.urandom(512)  # its old cluster goes to the next data write
            disk.pwrite(n * 512, chunks[n * 512])
            if n % 16 == 15:
                disk.flush()
        for at in list(chunks):  # rewrite in place, the old table's cluster included
            chunks[at] = os.urandom(512)
            disk.pwrite(at, chunks[at])
    assert peek(path, 48, ">Q") != old_table
    with open_disk(str(path), read_only=True) as disk:
        for at, data in chunks.items():
            assert disk.read(at, len(data)) == data
    assert check(str(path)).clean
    assert qemu_check(path)[0] == 0
    assert not corrupt_bit(path)
    # the old table's cluster was freed and is in use again (as data or a table)
    with Qcow2Image(str(path)) as image:
        assert image.refcounts.get(old_table >> 9) == 1


def test_l2_entry_into_a_refcount_block_is_refused_and_repairable(tmp_path):
    """iotests 060 "cluster data reference into refcount block"."""
    path = tmp_path / "rb.qcow2"
    qemu_image(path)
    with open(path, "r+b") as file:
        file.truncate(0x50000)
    poke(path, 0x30000, ">Q", (1 << 63) | 0x40000)  # L1[0] -> a (zero) L2 table at 0x40000
    poke(path, 0x20000 + 8, ">H", 1)  # refcount of cluster 4 (the L2 table)
    poke(path, 0x40000, ">Q", (1 << 63) | 0x20000)  # guest cluster 0 -> the refcount block
    assert check(str(path)).corruptions == qemu_check(path)[1]["corruptions"] == 2
    message = both_refuse_write(tmp_path, "rb")
    assert "a refcount block" in message
    # repair (vmctl) fixes it like qemu-img check -r all, and clears the corrupt bit
    report = check(str(path), repair="all")
    assert report.clean and report.corruptions_fixed >= 2 and not corrupt_bit(path)
    with open_disk(str(path), read_only=False) as disk:
        disk.pwrite(0, b"\x2a" * 512)
    assert qemu_check(path)[0] == 0
    assert qemu_io(path, "read -P 0x2a 0 512").returncode == 0
    assert "Pattern verification failed" not in qemu_io(path, "read -P 0x2a 0 512").stdout


def test_l1_entry_into_the_l1_table(tmp_path):
    """iotests 060 "L2 reference into L1": the L1 entry points at the L1 table itself."""
    path = tmp_path / "l1.qcow2"
    qemu_image(path)
    poke(path, 0x30000, ">Q", (1 << 63) | 0x30000)
    assert qemu_check(path)[0] == 2 and check(str(path)).corruptions == 1
    assert "L1 table" in both_refuse_write(tmp_path, "l1")


def test_l2_entry_into_its_own_l2_table(tmp_path):
    path = tmp_path / "self.qcow2"
    qemu_image(path, "64M", "compat=1.1", "write 0 64k")
    poke(path, 0x40000, ">Q", (1 << 63) | 0x40000)
    assert "L2 table" in both_refuse_write(tmp_path, "self")


def test_l1_entry_into_a_refcount_block(tmp_path):
    path = tmp_path / "l1rb.qcow2"
    qemu_image(path, "64M", "compat=1.1", "write 0 64k")
    poke(path, 0x30000, ">Q", (1 << 63) | 0x20000)
    assert "refcount block" in both_refuse_write(tmp_path, "l1rb")


def test_l2_entry_into_the_bitmap_directory(tmp_path):
    path = tmp_path / "bm.qcow2"
    qemu_image(path, "64M", "compat=1.1", "write 0 64k")
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "b0"], check=True)
    directory = None
    with open(path, "rb") as file:
        head = file.read(65536)
    at = 112
    while at + 8 <= len(head):
        kind, length = struct.unpack_from(">II", head, at)
        if kind == 0x23852875:
            directory = struct.unpack_from(">Q", head, at + 8 + 16)[0]
            break
        if kind == 0:
            break
        at += 8 + length + (-length % 8)
    assert directory
    poke(path, 0x40000, ">Q", (1 << 63) | directory)
    assert "bitmap directory" in both_refuse_write(tmp_path, "bm")


@pytest.mark.parametrize("victim,where", [
    ("L1 table", 0x20000 + 2 * 3),  # refcount of cluster 3
    ("L2 table", 0x20000 + 2 * 4),  # refcount of cluster 4
    ("refcount block", 0x20000 + 2 * 2),  # refcount of cluster 2
])
def test_zeroed_refcount_does_not_hand_out_live_metadata(tmp_path, victim, where):
    """iotests 060 "empty refcount block" and friends: a refcount of 0 on a live table
    must not let the allocator give that cluster to new data."""
    path = tmp_path / "zero.qcow2"
    qemu_image(path, "64M", "compat=1.1", "write 0 64k")
    poke(path, where, ">H", 0)
    # all lower clusters in use, so the allocator's first free cluster is the victim
    message = both_refuse_write(tmp_path, "zero", "write -P 0x2a 0x100000 512")
    assert victim.split()[0] in message


def test_zeroed_refcount_table_entry_does_not_hand_out_live_clusters(tmp_path):
    """iotests 060 "empty refcount table": the allocator would make a new refcount block at
    cluster 0 (the header)."""
    path = tmp_path / "rt.qcow2"
    qemu_image(path)
    poke(path, 0x10000, ">Q", 0)
    message = both_refuse_write(tmp_path, "rt", "write -P 0x2a 0 65536")
    assert "header" in message


def test_commit_grows_a_smaller_base_like_qemu_img(tmp_path):
    for fmt in ("qcow2", "raw"):
        base = tmp_path / f"base.{fmt}"
        if fmt == "raw":
            base.write_bytes(b"\1" * MiB)
        else:
            create(str(base), MiB, CreateOptions(4096))
        top = tmp_path / f"top-{fmt}.qcow2"
        create_overlay(str(base), str(top), size=200 * MiB)
        tail = os.urandom(70000)
        with open_disk(str(top), read_only=False) as disk:
            disk.pwrite(150 * MiB, tail)
            disk.pwrite(0, b"\2" * 4096)
        assert commit(str(top)) > 0
        assert info(str(base))["virtual-size"] == 200 * MiB
        with open_disk(str(base), read_only=True) as disk:
            assert disk.read(150 * MiB, len(tail)) == tail
            assert disk.read(0, 4097) == b"\2" * 4096 + (b"\1" if fmt == "raw" else b"\0")
        if fmt == "qcow2":
            assert check(str(base)).clean and qemu_check(base)[0] == 0


def test_failed_commit_leaves_the_base_untouched(tmp_path):
    base = tmp_path / "base.qcow2"
    create(str(base), MiB)
    top = tmp_path / "top.qcow2"
    create_overlay(str(base), str(top), size=64 * MiB)
    with open_disk(str(top), read_only=False) as disk:
        disk.pwrite(0, b"\2" * 65536)
        disk.pwrite(32 * MiB, b"\3" * 65536)
    # guest cluster 512 (32 MiB) now points past the end of the file
    image = Qcow2Image(str(top))
    _, l2, index = image._entry(512)
    image.close()
    poke(top, l2 + 8 * index, ">Q", (1 << 63) | (1 << 40))
    before = base.read_bytes()
    with pytest.raises(DiskFormatError, match="past the end"):
        commit(str(top))
    assert base.read_bytes() == before


def test_refcount_past_the_end_of_the_file_is_not_a_leak(tmp_path):
    """A crash after a refcount block reached the disk but before the data did: qemu-img
    check ignores counts past EOF, so does vmctl (they were a leak --repair could not fix)."""
    path = tmp_path / "eof.qcow2"
    qemu_image(path, "64M", "compat=1.1", "write 0 64k")
    size = path.stat().st_size
    poke(path, 0x20000 + 2 * (size // 65536 + 3), ">H", 1)
    assert qemu_check(path)[0] == 0
    assert check(str(path)).clean
    assert vmctl("image", "check", str(path)).returncode == 0


@pytest.mark.parametrize("offset,value", [
    (0x30000, (1 << 63) | 0x40000 | 1),  # L1 entry, reserved bit 0
    (0x40000, (1 << 63) | 0x50000 | 2),  # L2 entry, reserved bit 1
    (0x40000, (1 << 63) | (1 << 56) | 0x50000),  # L2 entry, reserved bit 56
    (0x10000, 0x20000 | 1),  # refcount table entry, reserved bit 0
])
def test_reserved_bits_are_corruptions(tmp_path, offset, value):
    path = tmp_path / "res.qcow2"
    qemu_image(path, "64M", "compat=1.1", "write 0 64k")
    poke(path, offset, ">Q", value)
    code, theirs = qemu_check(path)
    ours = check(str(path))
    assert code == 2 and ours.corruptions == theirs["corruptions"]
    assert ours.leaks == theirs.get("leaks", 0)
    assert vmctl("image", "check", str(path)).returncode == 2


def test_backing_name_with_a_nul_byte_is_a_c_string(tmp_path):
    base = tmp_path / "base.qcow2"
    create(str(base), MiB)
    top = tmp_path / "top.qcow2"
    create_overlay(str(base), str(top))
    name_at, name_len = peek(top, 8, ">Q"), peek(top, 16, ">I")
    assert name_len == len("base.qcow2")
    poke(top, name_at + name_len, ">4s", b"\0xyz")
    poke(top, 16, ">I", name_len + 4)
    theirs = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(top)],
                                       capture_output=True, text=True, check=True).stdout)
    assert info(str(top))["backing-filename"] == theirs["backing-filename"] == "base.qcow2"
    with open_disk(str(top), read_only=True) as disk:
        assert disk.read(0, 8) == bytes(8)


def test_v2_l2_entry_with_bit_0_is_an_io_error(tmp_path):
    path = tmp_path / "v2.qcow2"
    qemu_image(path, "64M", "compat=0.10", "write -P 7 0 64k")
    poke(path, 0x40000, ">Q", (1 << 63) | 0x50000 | 1)
    assert qemu_io(path, "read 0 512").stdout.count("read failed") == 1 or \
        "Input/output error" in qemu_io(path, "read 0 512").stderr + \
        qemu_io(path, "read 0 512").stdout
    with pytest.raises(DiskFormatError, match="version 2"):
        with open_disk(str(path), read_only=True) as disk:
            disk.read(0, 512)


def test_backing_file_offset_all_ones_is_refused(tmp_path):
    path = tmp_path / "bo.qcow2"
    qemu_image(path)
    poke(path, 8, ">Q", (1 << 64) - 1)
    assert "Invalid backing file offset" in qemu_io(path, "read 0 512").stderr
    with pytest.raises(DiskFormatError, match="backing_file_offset"):
        open_disk(str(path), read_only=True)


def test_info_json_lists_snapshots_like_qemu_img(tmp_path):
    path = tmp_path / "snap.qcow2"
    qemu_image(path, "64M", "compat=1.1", "write 0 64k")
    for name in ("first", "second"):
        subprocess.run(["qemu-img", "snapshot", "-c", name, str(path)], check=True)
    theirs = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                       capture_output=True, text=True, check=True).stdout)
    assert info(str(path))["snapshots"] == theirs["snapshots"]
    assert [s["name"] for s in theirs["snapshots"]] == ["first", "second"]


def test_rebase_resolves_a_relative_backing_from_the_overlay(tmp_path):
    sub = tmp_path / "vms"
    sub.mkdir()
    create(str(sub / "base.qcow2"), MiB)
    create(str(sub / "other.qcow2"), MiB)
    create_overlay(str(sub / "base.qcow2"), str(sub / "top.qcow2"))
    # from tmp_path, "other.qcow2" only exists next to the overlay, as qemu-img reads it
    done = vmctl("image", "rebase", "-b", "other.qcow2", "vms/top.qcow2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert info(str(sub / "top.qcow2"))["backing-filename"] == "other.qcow2"
    rebase(str(sub / "top.qcow2"), "base.qcow2", unsafe=True)
    assert info(str(sub / "top.qcow2"))["backing-filename"] == "base.qcow2"


def test_check_exit_codes_match_qemu_img(tmp_path):
    cases = {}
    clean = tmp_path / "clean.qcow2"
    qemu_image(clean, "64M", "compat=1.1", "write 0 64k")
    cases["clean"] = clean
    leak = tmp_path / "leak.qcow2"
    shutil.copy(clean, leak)
    with open(leak, "r+b") as file:
        file.truncate(0x70000)
    poke(leak, 0x20000 + 2 * 6, ">H", 1)
    cases["leak"] = leak
    broken = tmp_path / "broken.qcow2"
    shutil.copy(clean, broken)
    poke(broken, 0x20000 + 2 * 5, ">H", 0)
    cases["corrupt"] = broken
    garbage = tmp_path / "garbage.qcow2"
    garbage.write_bytes(b"QFI\xfb" + b"\xff" * 200)
    cases["unreadable"] = garbage
    expected = {"clean": 0, "leak": 3, "corrupt": 2, "unreadable": 1}
    for name, path in cases.items():
        theirs = subprocess.run(["qemu-img", "check", str(path)], capture_output=True)
        ours = vmctl("image", "check", str(path))
        assert ours.returncode == theirs.returncode == expected[name], (name, ours.stderr)
        assert "Traceback" not in ours.stderr
