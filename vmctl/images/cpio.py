"""cpio "newc" archives (the format the Linux kernel unpacks as an initramfs).

Deterministic by construction: entries are sorted by path, inode numbers are assigned in
that order, and every entry gets the same mtime. Content can be given inline (`data`) or as
a host file read only while writing (`source`), so large trees are streamed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable

from ..errors import VmctlError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_FIELDS = 13  # after the magic: ino mode uid gid nlink mtime filesize
#                      devmajor devminor rdevmajor rdevminor namesize check
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. `mode` is a full st_mode (file type bits included)."""

    path: str
    mode: int
    data: bytes = b""
    source: Path | None = None  # read at write time instead of `data` (regular files)
    uid: int = 0
    gid: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0

    def size(self) -> int:
        if self.source is not None:
            return self.source.stat().st_size
        return len(self.data)


def directory(path: str, perm: int = 0o755) -> CpioEntry:
    return CpioEntry(path, stat.S_IFDIR | perm)


def file(path: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(path, stat.S_IFREG | perm, data=data)


def symlink(path: str, target: str) -> CpioEntry:
    # newc stores a symlink's target as its content
    return CpioEntry(path, stat.S_IFLNK | 0o777, data=target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
    return CpioEntry(path, stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)


def block_device(path: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
    return CpioEntry(path, stat.S_IFBLK | perm, rdev_major=major, rdev_minor=minor)


def normalize(path: str) -> str:
    """'/a/./b' -> 'a/b'; the archive root is '.'. Rejects '..' so nothing escapes."""
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    if ".." in parts:
        raise VmctlError(f"cpio: path {path!r} leaves the archive root")
    return "/".join(parts) or "."


def write(entries: Iterable[CpioEntry], out: BinaryIO, mtime: int = 0) -> int:
    """Write a complete archive (with trailer) to `out`; return the number of bytes."""
    ordered: dict[str, CpioEntry] = {}
    for entry in entries:
        name = normalize(entry.path)
        if name in ordered:
            raise VmctlError(f"cpio: duplicate path {name!r}")
        ordered[name] = entry
    written = 0
    for ino, name in enumerate(sorted(ordered), start=1):
        written += _write_member(out, ordered[name], name, ino, mtime)
    trailer = CpioEntry(TRAILER, 0)
    written += _write_member(out, trailer, TRAILER, 0, 0, nlink=1)
    return written


def archive(entries: Iterable[CpioEntry], mtime: int = 0) -> bytes:
    """The archive as bytes (small archives and tests)."""
    import io

    buffer = io.BytesIO()
    write(entries, buffer, mtime)
    return buffer.getvalue()


def tree_entries(root: Path, owner: tuple[int, int] | None = (0, 0)) -> list[CpioEntry]:
    """Entries for everything under `root` (root itself excluded), symlinks not followed.

    `owner` forces uid/gid (default root:root, so a tree built by a normal user still boots
    as root's files); None keeps the owners on disk. Sockets are skipped.
    """
    root = Path(root)
    entries: list[CpioEntry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            host = Path(dirpath) / name
            entry = _entry_for(host, host.relative_to(root).as_posix(), owner)
            if entry is not None:
                entries.append(entry)
        # os.walk does not descend into symlinked directories: they were added as links
    return entries


def _entry_for(host: Path, rel: str, owner: tuple[int, int] | None) -> CpioEntry | None:
    st = host.lstat()
    uid, gid = owner if owner is not None else (st.st_uid, st.st_gid)
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return CpioEntry(rel, mode, data=os.readlink(host).encode(), uid=uid, gid=gid)
    if stat.S_ISREG(mode):
        return CpioEntry(rel, mode, source=host, uid=uid, gid=gid)
    if stat.S_ISDIR(mode) or stat.S_ISFIFO(mode):
        return CpioEntry(rel, mode, uid=uid, gid=gid)
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return CpioEntry(rel, mode, uid=uid, gid=gid,
                         rdev_major=os.major(st.st_rdev), rdev_minor=os.minor(st.st_rdev))
    return None


def _write_member(out: BinaryIO, entry: CpioEntry, name: str, ino: int, mtime: int,
                  nlink: int | None = None) -> int:
    size = entry.size()
    if nlink is None:
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    encoded = name.encode() + b"\0"
    fields = (ino, entry.mode, entry.uid, entry.gid, nlink, mtime, size,
              0, 0, entry.rdev_major, entry.rdev_minor, len(encoded), 0)
    assert len(fields) == _HEADER_FIELDS
    header = MAGIC + b"".join(b"%08X" % (value & 0xFFFFFFFF) for value in fields) + encoded
    out.write(header + _pad(len(header)))
    written = len(header) + len(_pad(len(header)))
    if entry.source is not None:
        copied = 0
        with open(entry.source, "rb") as src:
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
                copied += len(chunk)
        if copied != size:  # the file changed under us: the header would lie
            raise VmctlError(f"cpio: {entry.source} changed size while being archived")
    else:
        out.write(entry.data)
    out.write(_pad(size))
    return written + size + len(_pad(size))


def _pad(length: int) -> bytes:
    """newc aligns both the header+name and the data to 4 bytes."""
    return b"\0" * (-length % 4)
