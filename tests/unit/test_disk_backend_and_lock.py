"""BlockBackend behaviour shared by raw and qcow2 (scatter-gather, ranges, read-only), the
QEMU-compatible image lock, and the CLI's no-half-made-files rule."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmctl.cli import main
from vmctl.disk import DiskRangeError, ImageLockedError, ReadOnlyError, open_disk, probe_format
from vmctl.disk.qcow2.create import create, create_overlay

MiB = 1 << 20
HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


@pytest.fixture(params=["raw", "qcow2"])
def disk_path(request, tmp_path):
    path = tmp_path / f"d.{request.param}"
    if request.param == "raw":
        path.write_bytes(bytes(4 * MiB))
    else:
        create(str(path), 4 * MiB)
    return path


def test_scatter_gather_round_trip(disk_path):
    assert probe_format(str(disk_path)) == disk_path.suffix[1:]
    with open_disk(str(disk_path)) as disk:
        parts = [bytearray(b"a" * 1000), bytearray(b"b" * 70000), bytearray(b"c" * 3)]
        assert disk.write(65000, [memoryview(p) for p in parts]) == 71003
        out = [bytearray(500), bytearray(70503)]
        assert disk.readinto(65000, [memoryview(o) for o in out]) == 71003
        assert bytes(out[0] + out[1]) == b"a" * 1000 + b"b" * 70000 + b"c" * 3
        disk.write_zeroes(65500, 1000)
        assert disk.read(65000, 2000) == b"a" * 500 + bytes(1000) + b"b" * 500
        disk.discard(0, disk.size)  # advisory: must not fail
        disk.flush()
        with pytest.raises(DiskRangeError, match="outside the disk"):
            disk.read(disk.size - 10, 11)
        with pytest.raises(DiskRangeError):
            disk.pwrite(-1, b"x")
    with open_disk(str(disk_path), read_only=True) as disk:
        with pytest.raises(ReadOnlyError, match="read-only"):
            disk.pwrite(0, b"x")


def test_one_writer_many_readers(tmp_path):
    base = tmp_path / "base.qcow2"
    create(str(base), MiB)
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_overlay(str(base), str(a))
    create_overlay(str(base), str(b))
    with open_disk(str(a)) as first, open_disk(str(b)) as second:  # base shared read-only
        first.pwrite(0, b"1")
        second.pwrite(0, b"2")
        with pytest.raises(ImageLockedError, match="in use"):
            open_disk(str(a))  # a second writer of the same overlay
        with pytest.raises(ImageLockedError):
            open_disk(str(base))  # writing a base that guests are reading
        with open_disk(str(a), read_only=True, lock=False) as peek:  # inspection only
            assert peek.size == MiB
    with open_disk(str(a)) as again:  # released on close
        assert again.read(0, 1) == b"1"


@pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img not installed (Debian package qemu-utils)")
def test_lock_is_visible_to_qemu_and_back(tmp_path):
    path = tmp_path / "vm.qcow2"
    create(str(path), MiB)
    with open_disk(str(path)):
        result = subprocess.run(["qemu-img", "info", str(path)], capture_output=True, text=True)
        assert result.returncode != 0 and "lock" in result.stderr
        assert subprocess.run(["qemu-img", "info", "-U", str(path)],
                              capture_output=True).returncode == 0
    # qemu-io holding the image open read-write: we must refuse to write it
    holder = subprocess.Popen(["qemu-io", str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        holder.stdin.write("read 0 512\n")
        holder.stdin.flush()
        holder.stdout.readline()  # the image is open once qemu-io answers
        with pytest.raises(ImageLockedError):
            open_disk(str(path))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with open_disk(str(path)):
        pass


def test_cli_failures_leave_no_files(tmp_path, capsys):
    out = tmp_path / "out.qcow2"
    assert main(["image", "overlay", str(tmp_path / "missing.qcow2"), str(out)]) == 1
    assert main(["image", "convert", str(tmp_path / "missing.raw"), str(out)]) == 1
    assert main(["image", "create", str(out), "1P"]) == 1  # size too big for an L1 table
    assert main(["image", "create", "--cluster-size", "3K", str(out), "1G"]) == 1
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert all(line.startswith("vmctl: error: ") for line in err.strip().splitlines())


def test_cli_round_trip(tmp_path, capsys):
    import json

    raw = tmp_path / "root.img"
    raw.write_bytes(b"\x55" * MiB + bytes(MiB))
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    assert main(["image", "create", "--from", str(raw), str(base)]) == 0
    assert main(["image", "overlay", str(base), str(top)]) == 0
    assert main(["image", "create", str(top), "1G"]) == 1  # exists, no --force
    capsys.readouterr()
    assert main(["image", "info", "--json", str(top)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backing-filename"] == "base.qcow2" and data["virtual-size"] == 2 * MiB
    assert main(["image", "map", "--json", str(top)]) == 0
    extents = json.loads(capsys.readouterr().out)
    assert extents[0]["depth"] == 1 and extents[0]["data"]
    assert main(["image", "check", "--json", str(top)]) == 0
    assert json.loads(capsys.readouterr().out)["check-errors"] == 0
    with open_disk(str(top)) as disk:
        disk.pwrite(0, b"\x66" * 4096)
    assert main(["image", "commit", str(top)]) == 0
    assert main(["image", "convert", "-O", "raw", str(base), str(tmp_path / "back.img")]) == 0
    back = (tmp_path / "back.img").read_bytes()
    assert back[:4096] == b"\x66" * 4096 and back[4096:MiB] == b"\x55" * (MiB - 4096)
    assert main(["image", "rebase", "--no-backing", str(top)]) == 0
    assert "backing-filename" not in json.loads(
        (capsys.readouterr(), main(["image", "info", "--json", str(top)]),
         capsys.readouterr().out)[2])
