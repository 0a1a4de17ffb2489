"""A work directory that takes O_DIRECT: fio in the disk suite needs it in every column.

Inside the nested host /tmp is a tmpfs (no O_DIRECT). There the suite formats an ext4 file
system in a sparse file on that tmpfs and works on it through a loop device, so the native
and container columns' writable layers sit on ext4 over a RAM-backed block device, as the
VM's qcow2 overlay (a file on the same tmpfs) does behind virtio-blk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from ..errors import VmctlError

SIZE = "6G"  # sparse: only what is written takes memory


def supports_direct(folder: Path) -> bool:
    probe = folder / ".direct-probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    probe.unlink()
    return True


@contextlib.contextmanager
def direct_io_dir(work: Path) -> Iterator[Path]:
    """`work` itself when it takes O_DIRECT; else an ext4 loop mount inside it (removed after)."""
    if supports_direct(work):
        yield work
        return
    image, mountpoint = work / "fs.img", work / "fs"
    mountpoint.mkdir()
    with open(image, "wb") as out:
        out.truncate(int(SIZE[:-1]) << 30)
    done = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if done.returncode:
        raise VmctlError(f"suite scratch: mkfs.ext4 failed: {done.stderr.strip()[-200:]}")
    done = subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True, text=True)
    if done.returncode:
        # no loop devices (the nested host may have none): the disk suite then skips the
        # columns whose layer cannot take O_DIRECT, and says so
        print(f"compare: no O_DIRECT-capable scratch file system here ({done.stderr.strip()[-120:]})",
              file=sys.stderr, flush=True)
        image.unlink(missing_ok=True)
        mountpoint.rmdir()
        yield work
        return
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True)  # the loop device goes with it
        image.unlink(missing_ok=True)
