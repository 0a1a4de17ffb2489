"""The newc writer, checked against GNU cpio (listing and extraction)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vmctl.errors import VmctlError
from vmctl.images import cpio

pytestmark = pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio (apt: cpio)")


def sample_entries() -> list[cpio.CpioEntry]:
    return [
        cpio.file("/etc/hostname", b"guest\n"),
        cpio.directory("etc"),
        cpio.file("bin/tool", b"#!/bin/sh\necho odd-length\n" * 3, perm=0o755),
        cpio.directory("bin"),
        cpio.symlink("bin/sh", "/bin/busybox"),
        cpio.directory("dev"),
        cpio.char_device("dev/console", 5, 1),
        cpio.file("empty", b""),
        cpio.file("data/a b.txt", b"x"),
        cpio.directory("data"),
    ]


def gnu_list(archive: bytes) -> list[str]:
    out = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True,
                         check=True)
    return out.stdout.decode().splitlines()


def test_listing_is_sorted_and_complete():
    names = gnu_list(cpio.archive(sample_entries()))
    assert names == sorted(names)
    assert set(names) == {"etc", "etc/hostname", "bin", "bin/tool", "bin/sh", "dev",
                          "dev/console", "empty", "data", "data/a b.txt"}


def test_verbose_listing_shows_types_modes_and_devices():
    archive = cpio.archive(sample_entries())
    out = subprocess.run(["cpio", "-tv", "--quiet", "--numeric-uid-gid"], input=archive,
                         capture_output=True, check=True).stdout.decode()
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line
             for line in out.splitlines()}
    assert lines["bin/tool"].startswith("-rwxr-xr-x")
    assert lines["dev/console"].startswith("crw-------")
    assert "5,   1" in lines["dev/console"] or "5, 1" in lines["dev/console"]
    assert lines["bin/sh"].startswith("lrwxrwxrwx") and lines["bin/sh"].endswith(
        "-> /bin/busybox")
    assert lines["etc"].startswith("drwxr-xr-x")


def test_extraction_round_trip(tmp_path: Path):
    archive = cpio.archive(sample_entries())
    subprocess.run(["cpio", "-i", "--quiet", "--make-directories", "--no-absolute-filenames"],
                   input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "etc/hostname").read_bytes() == b"guest\n"
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho odd-length\n" * 3
    assert os.stat(tmp_path / "bin/tool").st_mode & 0o777 == 0o755
    assert os.readlink(tmp_path / "bin/sh") == "/bin/busybox"
    assert (tmp_path / "empty").read_bytes() == b""
    assert (tmp_path / "data/a b.txt").read_bytes() == b"x"


def test_deterministic_and_aligned():
    first = cpio.archive(sample_entries(), mtime=1234)
    second = cpio.archive(list(reversed(sample_entries())), mtime=1234)
    assert first == second
    assert len(first) % 4 == 0
    assert first.startswith(b"070701")
    assert b"TRAILER!!!\0" in first[-128:]


def test_header_fields_by_hand():
    data = cpio.archive([cpio.file("a", b"xyz", perm=0o600)], mtime=0x10)
    fields = [int(data[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
    ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, check = fields
    assert (ino, mode, uid, gid, nlink, mtime, size) == (1, stat.S_IFREG | 0o600, 0, 0, 1,
                                                         0x10, 3)
    assert (rmaj, rmin, namesize, check) == (0, 0, 2, 0)
    assert data[110:112] == b"a\0"
    assert data[112:115] == b"xyz"  # 110 + 2 is already 4-aligned


def test_rejects_escapes_and_duplicates():
    with pytest.raises(VmctlError):
        cpio.archive([cpio.file("../etc/passwd", b"")])
    with pytest.raises(VmctlError):
        cpio.archive([cpio.file("a", b""), cpio.file("/a", b"1")])


def test_tree_entries_stream_a_directory(tmp_path: Path):
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/prog").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    os.chmod(root / "usr/bin/prog", 0o751)
    (root / "usr/lib").symlink_to("bin")
    (root / "init").write_text("#!/bin/sh\n")
    os.mkfifo(root / "fifo")
    entries = cpio.tree_entries(root)
    assert all(e.uid == 0 and e.gid == 0 for e in entries)
    out = tmp_path / "out.cpio"
    with open(out, "wb") as f:
        written = cpio.write(entries, f)
    assert written == out.stat().st_size
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    with open(out, "rb") as f:
        subprocess.run(["cpio", "-i", "--quiet", "--make-directories"], stdin=f,
                       cwd=unpacked, check=True)
    assert (unpacked / "usr/bin/prog").read_bytes() == (root / "usr/bin/prog").read_bytes()
    assert os.stat(unpacked / "usr/bin/prog").st_mode & 0o777 == 0o751
    assert os.readlink(unpacked / "usr/lib") == "bin"
    assert stat.S_ISFIFO(os.lstat(unpacked / "fifo").st_mode)
    assert gnu_list(out.read_bytes()) == sorted(gnu_list(out.read_bytes()))
