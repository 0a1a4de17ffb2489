"""Raw disk files: the virtual disk is the file, byte for byte."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from typing import Any, Sequence

from . import image_lock as lock_mod
from .block_backend import (
    IOV_MAX,
    BlockBackend,
    ByteViews,
    DiskError,
    Iovecs,
    as_bytes_views,
    chunks,
    slice_buffers,
    total_length,
)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE): frees the range and makes it read as zeros. False if the
    filesystem cannot do it (the caller then writes zeros)."""
    global _libc
    if _libc is None:
        from ..kvm.ioctl import libc  # glibc, loaded once without `ldconfig -p`
        _libc = libc()
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise DiskError(f"fallocate failed: {os.strerror(ctypes.get_errno())}")


_vector_io: tuple[Any, Any] | None = None


def _vector_calls() -> tuple[Any, Any]:
    """libc's preadv and pwritev over a packed iovec array (ctypes drops the GIL around them)."""
    global _vector_io
    if _vector_io is None:
        library = ctypes.CDLL("libc.so.6", use_errno=True)  # a handle of our own: argtypes are per handle
        calls = library.preadv, library.pwritev
        for call in calls:
            call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int64]
            call.restype = ctypes.c_ssize_t
        _vector_io = calls
    return _vector_io


def _vector(call: Any, fd: int, iovecs: Iovecs, offset: int) -> int:
    while True:
        done: int = call(fd, iovecs.packed, iovecs.count, offset)
        if done >= 0:
            return done
        error = ctypes.get_errno()
        if error != errno.EINTR:
            raise OSError(error, os.strerror(error))


class RawDisk(BlockBackend):
    def __init__(self, path: str, *, read_only: bool = True, lock: bool = True) -> None:
        self.path = path
        self._read_only = read_only
        self._mutex = threading.Lock()
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as error:
            raise DiskError(f"{path}: cannot open: {error.strerror}") from None
        try:
            if lock:
                lock_mod.acquire(self.fd, path, lock_mod.READER if read_only else lock_mod.WRITER)
            self._size = os.fstat(self.fd).st_size
            _vector_calls()  # bound now, before a VMM's seccomp filter could refuse what dlopen does
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> int:
        views = as_bytes_views(buffers)
        length = total_length(views)
        self._check_range(offset, length, "read")
        got = 0
        for group in chunks(views):
            got += os.preadv(self.fd, group, offset + got)
        if got < length:  # the file shrank under us: the rest reads as zeros
            for view in slice_buffers(views, got, length - got):
                view[:] = bytes(view.nbytes)
        return length

    def readinto_iovecs(self, offset: int, iovecs: Iovecs) -> int:
        length = iovecs.nbytes
        self._check_range(offset, length, "read")
        if iovecs.count > IOV_MAX:
            return self.readinto(offset, ByteViews(iovecs.views(), length))
        got = _vector(_vector_calls()[0], self.fd, iovecs, offset)
        if got < length:  # the file shrank under us: the rest reads as zeros
            for view in slice_buffers(iovecs.views(), got, length - got):
                view[:] = bytes(view.nbytes)
        return length

    def write_iovecs(self, offset: int, iovecs: Iovecs) -> int:
        length = iovecs.nbytes
        self._check_writable("write")
        self._check_range(offset, length, "write")
        if iovecs.count > IOV_MAX:
            return self.write(offset, ByteViews(iovecs.views(), length))
        done = _vector(_vector_calls()[1], self.fd, iovecs, offset)
        if done != length:
            raise DiskError(f"{self.path}: short write at {offset:#x} ({done}/{length})")
        return length

    def write(self, offset: int, buffers: Sequence[memoryview]) -> int:
        views = as_bytes_views(buffers)
        length = total_length(views)
        self._check_writable("write")
        self._check_range(offset, length, "write")
        done = 0
        for group in chunks(views):
            done += os.pwritev(self.fd, group, offset + done)
        if done != length:
            raise DiskError(f"{self.path}: short write at {offset:#x} ({done}/{length})")
        return length

    def flush(self) -> None:
        if not self._read_only:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        self._check_writable("discard")
        self._check_range(offset, length, "discard")
        if length:
            _punch_hole(self.fd, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable("write-zeroes")
        self._check_range(offset, length, "write-zeroes")
        if not length or _punch_hole(self.fd, offset, length):
            return
        zeros = memoryview(bytes(min(length, 1 << 20)))
        while length:
            count = min(length, len(zeros))
            self.write(offset, [zeros[:count]])
            offset += count
            length -= count

    def close(self) -> None:
        with self._mutex:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
