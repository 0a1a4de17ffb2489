"""The FUSE wire protocol (linux/fuse.h, protocol 7.31): opcodes, structs, errors.

Requests and replies are the same bytes whether they come through the host's `/dev/fuse`
or a virtio-fs queue: `fuse_in_header` + opcode-specific arguments in, `fuse_out_header`
+ reply out. Layouts are checked against the host's <linux/fuse.h> by a unit test.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAJOR = 7
MINOR = 31  # what we speak; the kernel adapts to an older minor than its own

# Opcodes (enum fuse_opcode).
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = range(8, 19)
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = range(20, 27)
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS, CREATE = range(27, 36)
INTERRUPT, BMAP, DESTROY, IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE = range(36, 44)
READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE, SETUPMAPPING, REMOVEMAPPING, SYNCFS = range(44, 51)

# Requests that get no reply at all.
NO_REPLY = frozenset({FORGET, BATCH_FORGET})

# INIT flags we may accept.
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
NO_OPEN_SUPPORT = 1 << 17  # informational: the kernel takes ENOSYS to OPEN as "opens need no message"
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3

# setattr `valid` bits.
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 16, 32, 64
FATTR_ATIME_NOW, FATTR_MTIME_NOW = 128, 256

FSYNC_FDATASYNC = 1
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid (+nsec x2), then attr
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy, then attr
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (rest ignored)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64 bytes
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # 88 bytes
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = READ_IN
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
KSTATFS = struct.Struct("<QQQQQIIII24x")  # 80 bytes
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then name padded to 8

STRUCT_SIZES = {  # name in <linux/fuse.h> -> our size, for the layout test
    "fuse_in_header": IN_HEADER.size, "fuse_out_header": OUT_HEADER.size, "fuse_attr": ATTR.size,
    "fuse_entry_out": ENTRY_OUT.size + ATTR.size, "fuse_attr_out": ATTR_OUT.size + ATTR.size,
    "fuse_open_out": OPEN_OUT.size, "fuse_init_out": INIT_OUT.size, "fuse_getattr_in": GETATTR_IN.size,
    "fuse_setattr_in": SETATTR_IN.size, "fuse_mknod_in": MKNOD_IN.size, "fuse_mkdir_in": MKDIR_IN.size,
    "fuse_rename2_in": RENAME2_IN.size, "fuse_link_in": LINK_IN.size, "fuse_open_in": OPEN_IN.size,
    "fuse_create_in": CREATE_IN.size, "fuse_read_in": READ_IN.size, "fuse_write_in": WRITE_IN.size,
    "fuse_write_out": WRITE_OUT.size, "fuse_release_in": RELEASE_IN.size, "fuse_flush_in": FLUSH_IN.size,
    "fuse_fsync_in": FSYNC_IN.size, "fuse_forget_in": FORGET_IN.size,
    "fuse_batch_forget_in": BATCH_FORGET_IN.size, "fuse_forget_one": FORGET_ONE.size,
    "fuse_kstatfs": KSTATFS.size, "fuse_dirent": DIRENT.size,
    "fuse_direntplus": ENTRY_OUT.size + ATTR.size + DIRENT.size,
}


class ProtocolError(Exception):
    """A request too short for its header or arguments (answered with EINVAL / EIO)."""


@dataclass(frozen=True, slots=True)
class Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: bytes  # the arguments after the header (and after any extensions)

    @classmethod
    def parse(cls, data: bytes | memoryview) -> "Request":
        if len(data) < IN_HEADER.size:
            raise ProtocolError(f"request of {len(data)} bytes is shorter than fuse_in_header")
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(data)
        if length > len(data) or length < IN_HEADER.size:
            raise ProtocolError(f"fuse_in_header.len {length} does not match the {len(data)} bytes received")
        return cls(opcode, unique, nodeid, uid, gid, pid, bytes(data[IN_HEADER.size : length]))

    def args(self, layout: struct.Struct) -> tuple:
        if len(self.body) < layout.size:
            raise ProtocolError(f"opcode {self.opcode}: {len(self.body)} argument bytes, need {layout.size}")
        return layout.unpack_from(self.body)

    def names(self, skip: int = 0, count: int = 1) -> list[bytes]:
        """`count` NUL-terminated names starting at byte `skip` of the body."""
        parts = self.body[skip:].split(b"\0")
        if len(parts) < count + 1:
            raise ProtocolError(f"opcode {self.opcode}: expected {count} NUL-terminated name(s)")
        return parts[:count]


def reply(unique: int, payload: bytes = b"", error: int = 0) -> bytes:
    """A reply: `error` is a positive errno (sent negated) or 0 with the payload."""
    if error:
        return OUT_HEADER.pack(OUT_HEADER.size, -error, unique)
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def dirent(ino: int, offset: int, kind: int, name: bytes) -> bytes:
    entry = DIRENT.pack(ino, offset, len(name), kind) + name
    return entry + b"\0" * (-len(entry) % 8)


def direntplus(entry_out: bytes, ino: int, offset: int, kind: int, name: bytes) -> bytes:
    """fuse_direntplus: a LOOKUP's answer (fuse_entry_out) followed by the fuse_dirent."""
    return entry_out + dirent(ino, offset, kind, name)
