"""Just enough of an ext4 superblock to say whether a raw file can be a DAX-mounted base.

A virtio-pmem base is mounted `-t ext4 -o ro,dax` by the guest: it must be a raw ext4 image
(not qcow2, no partition table) with 4 KiB blocks (DAX maps file blocks as 4 KiB pages),
and its journal must be clean (a read-only device cannot replay one).
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import VmctlError

SUPERBLOCK_OFFSET = 1024
EXT4_MAGIC = 0xEF53
DAX_BLOCK_SIZE = 4096
INCOMPAT_RECOVER = 0x4  # the journal holds transactions still to replay


def check_dax_base(path: Path) -> int:
    """The file's size when it is a clean raw ext4 with 4 KiB blocks; else VmctlError with
    one line saying what it is instead."""
    if not path.exists():
        raise VmctlError(f"{path}: no such file")
    if not path.is_file():
        raise VmctlError(f"{path}: not a regular file (a raw ext4 image)")
    try:
        with open(path, "rb") as handle:
            head = handle.read(SUPERBLOCK_OFFSET + 1024)
    except OSError as error:
        raise VmctlError(f"{path}: cannot read: {error.strerror}") from None
    if head[:4] == b"QFI\xfb":
        raise VmctlError(f"{path}: a qcow2 image, not raw ext4 (qemu-img convert -O raw)")
    if len(head) < SUPERBLOCK_OFFSET + 1024:
        raise VmctlError(f"{path}: too small to be an ext4 file system")
    (magic,) = struct.unpack_from("<H", head, SUPERBLOCK_OFFSET + 56)
    if magic != EXT4_MAGIC:
        raise VmctlError(f"{path}: not a raw ext2/3/4 file system (no superblock magic)")
    (log_block,) = struct.unpack_from("<I", head, SUPERBLOCK_OFFSET + 24)
    block = 1024 << log_block if log_block < 16 else 0
    if block != DAX_BLOCK_SIZE:
        raise VmctlError(f"{path}: ext4 with {block}-byte blocks; DAX needs 4096 (mkfs.ext4 -b 4096)")
    (incompat,) = struct.unpack_from("<I", head, SUPERBLOCK_OFFSET + 96)
    if incompat & INCOMPAT_RECOVER:
        raise VmctlError(f"{path}: its journal needs recovery, which a read-only mount cannot do (e2fsck -f)")
    return path.stat().st_size
