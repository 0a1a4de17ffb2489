"""Image locks that QEMU understands: one writer per image, readers share freely.

QEMU (file-posix) takes shared open-file-description (OFD) byte locks: byte 100+i while it
holds permission i, byte 200+i while it refuses to share permission i with others. vmctl
takes the same bytes, so a QEMU guest and a vmctl guest cannot both write one overlay,
and `qemu-img info` on an overlay vmctl is writing fails exactly as it does for QEMU.
OFD locks belong to the open file, so two opens in one process also conflict.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from .block_backend import DiskError

PERM_BASE = 100
SHARED_BASE = 200
# QEMU permission bits, by index: consistent read, write, write-unchanged, resize.
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = range(4)

_FLOCK = struct.Struct("hh4xqqi4x")  # struct flock on x86-64 / aarch64 Linux


class ImageLockedError(DiskError):
    """Another process (or another open in this one) uses the image incompatibly."""


@dataclass(frozen=True)
class LockMode:
    held: frozenset[int]
    unshared: frozenset[int]


# A writer holds all permissions and lets nobody else write or resize.
WRITER = LockMode(frozenset({CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE}),
                  frozenset({WRITE, RESIZE}))
# A reader (a running guest's base, or `vmctl image info`) only needs the bytes to stay put.
READER = LockMode(frozenset({CONSISTENT_READ}), frozenset({WRITE, RESIZE}))
# Inspecting without any guarantee (like qemu-img -U): no locks at all.
NONE = LockMode(frozenset(), frozenset())


def _flock(fd: int, command: int, kind: int, byte: int) -> int:
    packed = _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)
    result = fcntl.fcntl(fd, command, packed)
    kind_now: int = _FLOCK.unpack(result)[0]
    return kind_now


def _someone_else_locks(fd: int, byte: int) -> bool:
    # A write-lock probe conflicts with any other open file's shared lock on the byte.
    return _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def acquire(fd: int, path: str, mode: LockMode) -> None:
    """Take the lock bytes of `mode` on `fd`, or raise ImageLockedError naming the conflict."""
    if not mode.held and not mode.unshared:
        return
    try:
        for perm in sorted(mode.held):
            if _someone_else_locks(fd, SHARED_BASE + perm):
                raise ImageLockedError(
                    f"{path}: image is in use: another process does not share the "
                    f"'{PERM_NAMES[perm]}' permission (is a VM or qemu using it?)"
                )
        for perm in sorted(mode.unshared):
            if _someone_else_locks(fd, PERM_BASE + perm):
                raise ImageLockedError(
                    f"{path}: image is in use: another process holds the "
                    f"'{PERM_NAMES[perm]}' permission (is a VM writing to it?)"
                )
        for perm in mode.held:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, PERM_BASE + perm)
        for perm in mode.unshared:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, SHARED_BASE + perm)
    except OSError as error:
        if error.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            _fallback_flock(fd, path, mode)
            return
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(f"{path}: image is in use by another process") from None
        raise DiskError(f"{path}: cannot lock image: {error.strerror}") from None


def _fallback_flock(fd: int, path: str, mode: LockMode) -> None:
    """Filesystems without OFD byte locks: a whole-file flock still gives one writer."""
    kind = fcntl.LOCK_EX if WRITE in mode.held else fcntl.LOCK_SH
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError:
        raise ImageLockedError(f"{path}: image is in use by another process") from None
