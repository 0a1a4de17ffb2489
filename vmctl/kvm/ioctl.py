"""ioctl(2) through libc with errno, so EINTR reaches us instead of being retried or hidden."""

from __future__ import annotations

import ctypes
import os
from typing import Any

# glibc's soname, not ctypes.util.find_library("c"): that runs `ldconfig -p` in a
# subprocess (and imports subprocess, tempfile, shutil...) on every VMM start-up.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.Array[Any] | ctypes._SimpleCData[Any] | int | None = None) -> int:
    """Issue one ioctl; a struct argument is passed by pointer, an int by value.

    ctypes drops the GIL around the call, so a vCPU blocked in KVM_RUN does not stall the
    other threads. Raises OSError (with errno, e.g. EINTR) when the kernel returns -1.
    """
    if arg is None:
        pointer = None
    elif isinstance(arg, int):
        pointer = arg
    else:
        pointer = ctypes.addressof(arg)
    result: int = _libc.ioctl(fd, request, pointer)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{os.strerror(errno)} (ioctl 0x{request:x})")
    return result


def libc() -> ctypes.CDLL:
    return _libc
