"""Serve a `FileServer` to the host's own kernel: open /dev/fuse, mount(2), answer requests.

No fusermount and no libfuse: as root, `mount -t fuse.vmctl` with `fd=N` in the options
hands the kernel our /dev/fuse fd, and every request for the mount point arrives as one
read() on it. This is how the server is tested with real file tools and no VM.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from pathlib import Path

from ..errors import VmctlError
from .server import FileServer

log = logging.getLogger(__name__)

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
READ_BUFFER = 1 << 20 | 4096  # max_write + headers fits with room to spare
THREADS = 4

_libc = ctypes.CDLL(None, use_errno=True)


def mounted(mountpoint: str | os.PathLike) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def unmount(mountpoint: str | os.PathLike, lazy: bool = True) -> None:
    if _libc.umount2(os.fsencode(os.path.realpath(mountpoint)), MNT_DETACH if lazy else 0) != 0:
        code = ctypes.get_errno()
        raise VmctlError(f"umount {mountpoint}: {os.strerror(code)}")


class HostMount:
    """`HostMount(server, mountpoint).start()` mounts and serves on threads; `stop()` unmounts."""

    def __init__(self, server: FileServer, mountpoint: str | os.PathLike, threads: int = THREADS) -> None:
        self.server = server
        self.mountpoint = os.path.realpath(mountpoint)
        self.threads = threads
        self.fd = -1
        self._workers: list[threading.Thread] = []

    def mount(self) -> None:
        if not os.path.isdir(self.mountpoint):
            raise VmctlError(f"{self.mountpoint}: mount point is not a directory")
        try:
            self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise VmctlError(f"/dev/fuse: {error.strerror} (FUSE needs root and the fuse module)") from None
        root_mode = stat.S_IFMT(os.stat(self.server.root).st_mode)
        options = (f"fd={self.fd},rootmode={root_mode:o},user_id=0,group_id=0,"
                   f"default_permissions,allow_other")
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if self.server.read_only else 0)
        if _libc.mount(b"vmctl", os.fsencode(self.mountpoint), b"fuse.vmctl", flags, options.encode()) != 0:
            code = ctypes.get_errno()
            os.close(self.fd)
            self.fd = -1
            raise VmctlError(f"mount {self.mountpoint}: {os.strerror(code)}")

    def serve_forever(self) -> None:
        """Answer requests until the file system is unmounted (reads then fail with ENODEV)."""
        while True:
            try:
                request = os.read(self.fd, READ_BUFFER)
            except OSError as error:
                if error.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue  # interrupted, or the kernel withdrew the request
                if error.errno in (errno.ENODEV, errno.EBADF):
                    return  # unmounted
                raise
            answer = self.server.handle(request)
            if answer is None:
                continue
            try:
                os.write(self.fd, answer)
            except OSError as error:
                if error.errno == errno.ENOENT:
                    continue  # the request was interrupted meanwhile
                if error.errno in (errno.ENODEV, errno.EBADF):
                    return
                log.warning("fuse: reply refused: %s", error)

    def start(self) -> "HostMount":
        self.mount()
        for index in range(self.threads):
            worker = threading.Thread(target=self.serve_forever, name=f"fuse-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self) -> None:
        if mounted(self.mountpoint):
            unmount(self.mountpoint)
        for worker in self._workers:
            worker.join(timeout=5)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.server.close()

    def __enter__(self) -> "HostMount":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def check_share_source(path: str | os.PathLike) -> Path:
    source = Path(path)
    if not source.exists():
        raise VmctlError(f"{source}: no such directory")
    if not source.is_dir():
        raise VmctlError(f"{source}: not a directory")
    return source.resolve()
