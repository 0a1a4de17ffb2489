"""A FUSE file server over one host directory: `FileServer(root).handle(request) -> reply`.

Nothing a client sends can reach outside the shared directory:
- every inode the client knows is an `O_PATH` fd the server holds; a name is only ever
  looked up one component at a time, relative to its parent's fd, with `O_NOFOLLOW`, and
  names containing "/" or equal to "." / ".." are refused (EACCES). A path is never
  resolved from a string, so there is no check-then-use window: renaming or replacing a
  directory after the client looked it up moves nothing outside, because the fd still
  names the directory that was looked up.
- symlinks are created and read, never followed by the server (the client's kernel follows
  them in its own namespace). Opening, chmod-ing or linking a node goes through
  /proc/self/fd/N, which names that exact inode, and only for regular files and
  directories.
- node ids and file handles are the server's own counters, never host fds; an unknown one
  is ESTALE / EBADF.
- no device nodes are created (EPERM) and setuid/setgid bits are dropped from regular
  files, so a guest cannot plant something the host would trust.
- `read_only=True` refuses every change with EROFS.

How much the client may cache is the share's `cache` mode (vmctl.fs.cache): it sets the
entry/attribute timeouts and whether opens need a message at all.

Requests are handled one at a time per caller; a lock keeps the node and handle tables
consistent when several threads serve one `/dev/fuse`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import protocol as p
from .cache import DEFAULT, CachePolicy, policy
from .protocol import ProtocolError, Request

log = logging.getLogger(__name__)

ROOT_ID = 1
NO_HANDLE = 0  # READ/WRITE/FSYNC of a file the kernel opened without a message (no-open)
MAX_WRITE = 128 * 1024
MAX_PAGES = MAX_WRITE // 4096
MODE_SAFE_MASK = ~(stat.S_ISUID | stat.S_ISGID)

_libc = ctypes.CDLL(None, use_errno=True)
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _check(result: int) -> None:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


@dataclass
class Node:
    nodeid: int
    fd: int  # O_PATH | O_NOFOLLOW
    key: tuple[int, int]  # (st_dev, st_ino)
    mode: int
    lookups: int = 0


@dataclass
class DirHandle:
    fd: int
    entries: list[tuple[bytes, int, int]] = field(default_factory=list)  # name, ino, d_type


class FileServer:
    def __init__(self, root: str | os.PathLike, read_only: bool = False, cache: str = DEFAULT) -> None:
        self.root = Path(root)
        self.read_only = read_only
        self.cache: CachePolicy = policy(cache)
        self.timeout = self.cache.timeout
        try:
            fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise OSError(error.errno, f"{root}: {error.strerror}") from None
        st = os.fstat(fd)
        self._lock = threading.Lock()
        self._nodes: dict[int, Node] = {ROOT_ID: Node(ROOT_ID, fd, (st.st_dev, st.st_ino), st.st_mode, 1)}
        self._by_key: dict[tuple[int, int], int] = {(st.st_dev, st.st_ino): ROOT_ID}
        self._next_node = ROOT_ID + 1
        self._files: dict[int, int] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._listings: dict[int, list[tuple[bytes, int, int]]] = {}  # node id -> listing (no OPENDIR)
        self._next_handle = 1
        self.max_write = MAX_WRITE
        self._ops: dict[int, Callable[[Request], bytes]] = {
            p.INIT: self._init, p.DESTROY: lambda r: b"", p.LOOKUP: self._lookup,
            p.GETATTR: self._getattr, p.SETATTR: self._setattr, p.READLINK: self._readlink,
            p.SYMLINK: self._symlink, p.MKNOD: self._mknod, p.MKDIR: self._mkdir,
            p.UNLINK: self._unlink, p.RMDIR: self._rmdir, p.RENAME: self._rename,
            p.RENAME2: self._rename2, p.LINK: self._link, p.OPEN: self._open, p.CREATE: self._create,
            p.READ: self._read, p.WRITE: self._write, p.RELEASE: self._release,
            p.FSYNC: self._fsync, p.OPENDIR: self._opendir, p.READDIR: self._readdir,
            p.READDIRPLUS: self._readdirplus,
            p.RELEASEDIR: self._releasedir, p.FSYNCDIR: self._fsyncdir, p.STATFS: self._statfs,
        }
        # FLUSH (on every close) has nothing to do here (no locks, writes go straight to the
        # file): it stays ENOSYS, which the kernel remembers, so closes cost no round trip.

    # ---- snapshots ---------------------------------------------------------------------

    def numbering(self) -> tuple[int, int]:
        """(next node id, next file handle): what a restored guest's driver may still hold lies below."""
        with self._lock:
            return self._next_node, self._next_handle

    def skip_numbers(self, next_node: int, next_handle: int) -> None:
        """Never hand out a node id or handle below these: a restored guest may still cache the
        saved server's (its dentries, inodes and open files), and must get ESTALE / EBADF for
        them, never another file that happens to have the same number here."""
        with self._lock:
            self._next_node = max(self._next_node, next_node)
            self._next_handle = max(self._next_handle, next_handle)

    # ---- entry point -------------------------------------------------------------------

    def handle(self, data: bytes | memoryview) -> bytes | None:
        """One request in, its reply out (None for requests that get no reply)."""
        try:
            request = Request.parse(data)
        except ProtocolError as error:
            log.warning("fuse: %s", error)
            unique = p.IN_HEADER.unpack_from(data)[2] if len(data) >= p.IN_HEADER.size else 0
            return p.reply(unique, error=errno.EIO)
        if request.opcode in p.NO_REPLY:
            try:
                if request.opcode == p.FORGET:
                    self._forget_many([(request.nodeid, request.args(p.FORGET_IN)[0])])
                else:
                    self._batch_forget(request)
            except ProtocolError as error:  # nothing to answer: drop it (found by fuzzing)
                log.warning("fuse: %s", error)
            return None
        if request.opcode == p.INTERRUPT:
            return None  # requests are answered synchronously; nothing to interrupt
        op = self._ops.get(request.opcode)
        if op is None:
            return p.reply(request.unique, error=errno.ENOSYS)
        try:
            return p.reply(request.unique, op(request))
        except OSError as error:
            return p.reply(request.unique, error=error.errno or errno.EIO)
        except ProtocolError as error:
            log.warning("fuse: %s", error)
            return p.reply(request.unique, error=errno.EINVAL)
        except OverflowError:  # an offset, size or flags word beyond what the call takes
            return p.reply(request.unique, error=errno.EINVAL)  # (found by fuzzing)

    # ---- zero-copy data path (virtio-fs: straight between the file and guest memory) ---

    def read_into(self, fh: int, views: list[memoryview], offset: int, nodeid: int = 0) -> int:
        """READ into `views` (the reply buffers after fuse_out_header); bytes read."""
        if not views:
            return 0
        with self._opened(nodeid, fh, os.O_RDONLY) as fd:
            return os.preadv(fd, views, offset)

    def write_from(self, fh: int, views: list[memoryview], offset: int, nodeid: int = 0) -> int:
        """WRITE from `views` (the request's data after fuse_write_in); bytes written."""
        self._writable()
        if not views:
            return 0
        with self._opened(nodeid, fh, os.O_WRONLY) as fd:
            return os.pwritev(fd, views, offset)

    def close(self) -> None:
        with self._lock:
            for fd in self._files.values():
                os.close(fd)
            for handle in self._dirs.values():
                os.close(handle.fd)
            for node in self._nodes.values():
                os.close(node.fd)
            self._files.clear()
            self._dirs.clear()
            self._listings.clear()
            self._nodes.clear()
            self._by_key.clear()

    # ---- tables ------------------------------------------------------------------------

    def _node(self, nodeid: int) -> Node:
        node = self._nodes.get(nodeid)
        if node is None:
            raise OSError(errno.ESTALE, "unknown node id")
        return node

    def _file(self, fh: int) -> int:
        fd = self._files.get(fh)
        if fd is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return fd

    @contextlib.contextmanager
    def _opened(self, nodeid: int, fh: int, flags: int) -> Iterator[int]:
        """The fd for a READ/WRITE/FSYNC: the handle's, or, for handle 0 (a file the kernel
        opened without a message), the node's inode opened for this one request. Opening per
        request keeps no fd per node around and costs far less than the round trip."""
        if fh != NO_HANDLE or not self.cache.no_open:
            yield self._file(fh)
            return
        node = self._node(nodeid)
        if not stat.S_ISREG(node.mode):
            raise OSError(errno.EBADF, "no file handle for a non-file")
        fd = self._reopen(node, flags)
        try:
            yield fd
        finally:
            os.close(fd)

    def _remember(self, fd: int, st: os.stat_result) -> Node:
        """The node for an O_PATH fd just opened (an existing node for the same inode wins)."""
        key = (st.st_dev, st.st_ino)
        with self._lock:
            nodeid = self._by_key.get(key)
            if nodeid is not None:
                node = self._nodes[nodeid]
                os.close(fd)
                node.mode = st.st_mode
            else:
                node = Node(self._next_node, fd, key, st.st_mode)
                self._next_node += 1
                self._nodes[node.nodeid] = node
                self._by_key[key] = node.nodeid
            node.lookups += 1
            return node

    def _forget_many(self, items: list[tuple[int, int]]) -> None:
        with self._lock:
            for nodeid, count in items:
                node = self._nodes.get(nodeid)
                if node is None or nodeid == ROOT_ID:
                    continue
                node.lookups -= count
                if node.lookups <= 0:
                    del self._nodes[nodeid]
                    self._listings.pop(nodeid, None)
                    self._by_key.pop(node.key, None)
                    os.close(node.fd)

    def _batch_forget(self, request: Request) -> None:
        count, _ = request.args(p.BATCH_FORGET_IN)
        body = request.body[p.BATCH_FORGET_IN.size :]
        count = min(count, len(body) // p.FORGET_ONE.size)
        self._forget_many([p.FORGET_ONE.unpack_from(body, i * p.FORGET_ONE.size) for i in range(count)])

    # ---- helpers -----------------------------------------------------------------------

    @staticmethod
    def _name(raw: bytes) -> bytes:
        """A single path component, or EACCES: the only way out of a directory fd is a
        name with a slash or a dot-dot, so those are refused outright."""
        if not raw or raw in (b".", b"..") or b"/" in raw or len(raw) > 255:
            raise OSError(errno.EACCES, "name outside the shared folder")
        return raw

    def _writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only share")

    @staticmethod
    def _attr(st: os.stat_result) -> bytes:
        return p.ATTR.pack(
            st.st_ino, st.st_size, st.st_blocks, int(st.st_atime), int(st.st_mtime), int(st.st_ctime),
            st.st_atime_ns % 1_000_000_000, st.st_mtime_ns % 1_000_000_000, st.st_ctime_ns % 1_000_000_000,
            st.st_mode, min(st.st_nlink, 0xFFFFFFFF), st.st_uid, st.st_gid, st.st_rdev & 0xFFFFFFFF,
            st.st_blksize, 0)

    def _entry(self, parent: Node, name: bytes) -> bytes:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        node = self._remember(fd, st)
        return p.ENTRY_OUT.pack(node.nodeid, 0, self.timeout, self.timeout, 0, 0) + self._attr(st)

    def _owner(self, parent: Node, name: bytes, request: Request) -> None:
        """New files belong to the caller, as on a local filesystem (we run as root)."""
        if os.geteuid() == 0:
            os.chown(name, request.uid, request.gid, dir_fd=parent.fd, follow_symlinks=False)

    def _reopen(self, node: Node, flags: int) -> int:
        """A real fd for a node's inode; only regular files and directories are reopened."""
        if not (stat.S_ISREG(node.mode) or stat.S_ISDIR(node.mode)):
            raise OSError(errno.EACCES, "not a regular file or directory")
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_PATH)
        return os.open(_proc(node.fd), flags | os.O_CLOEXEC)

    def _new_handle(self) -> int:
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            return handle

    # ---- operations --------------------------------------------------------------------

    def _init(self, request: Request) -> bytes:
        major, minor, max_readahead, flags = request.args(p.INIT_IN)
        if major < p.MAJOR:
            raise OSError(errno.EPROTO, f"FUSE {major}.{minor} is too old")
        if major > p.MAJOR:  # the kernel then asks again with our major
            return p.INIT_OUT.pack(p.MAJOR, p.MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        # AUTO_INVAL_DATA + FOPEN_KEEP_CACHE: a client keeps a file's pages across opens and
        # drops them when it sees another mtime or size (attributes are refreshed after the
        # cache mode's timeout), so cached reads stay in its page cache and others' writes show.
        # DO_READDIRPLUS (not _AUTO): every listing carries the entries' attributes, so a walk
        # does not LOOKUP each name.
        wanted = (p.ASYNC_READ | p.BIG_WRITES | p.PARALLEL_DIROPS | p.MAX_PAGES | p.AUTO_INVAL_DATA
                  | p.DO_READDIRPLUS)
        if not self.cache.no_open:
            # O_TRUNC is done by our OPEN; without OPEN messages the kernel must send SETATTR
            wanted |= p.ATOMIC_O_TRUNC
        return p.INIT_OUT.pack(p.MAJOR, min(minor, p.MINOR), max_readahead, flags & wanted,
                               16, 12, self.max_write, 1, MAX_PAGES, 0, 0)

    def _lookup(self, request: Request) -> bytes:
        parent = self._node(request.nodeid)
        return self._entry(parent, self._name(request.names()[0]))

    def _getattr(self, request: Request) -> bytes:
        node = self._node(request.nodeid)
        return p.ATTR_OUT.pack(self.timeout, 0, 0) + self._attr(os.fstat(node.fd))

    def _setattr(self, request: Request) -> bytes:
        self._writable()
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid, _) = \
            request.args(p.SETATTR_IN)
        node = self._node(request.nodeid)
        symlink = stat.S_ISLNK(node.mode)
        if valid & p.FATTR_MODE:
            if symlink:
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            if stat.S_ISREG(node.mode):
                mode &= MODE_SAFE_MASK
            os.chmod(_proc(node.fd), stat.S_IMODE(mode))
        if valid & (p.FATTR_UID | p.FATTR_GID):
            _check(_libc.fchownat(node.fd, b"", uid if valid & p.FATTR_UID else -1,
                                  gid if valid & p.FATTR_GID else -1, AT_EMPTY_PATH))
        if valid & p.FATTR_SIZE:
            if valid & p.FATTR_FH and fh in self._files:
                os.ftruncate(self._files[fh], size)
            else:
                if not stat.S_ISREG(node.mode):
                    raise OSError(errno.EINVAL, "truncate of a non-file")
                fd = self._reopen(node, os.O_WRONLY)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        if valid & (p.FATTR_ATIME | p.FATTR_MTIME):
            def spec(flag: int, now: int, sec: int, nsec: int) -> _Timespec:
                if not valid & flag:
                    return _Timespec(0, UTIME_OMIT)
                return _Timespec(0, UTIME_NOW) if valid & now else _Timespec(sec, nsec)
            times = (_Timespec * 2)(spec(p.FATTR_ATIME, p.FATTR_ATIME_NOW, atime, atimensec),
                                    spec(p.FATTR_MTIME, p.FATTR_MTIME_NOW, mtime, mtimensec))
            if symlink:
                _check(_libc.utimensat(node.fd, b"", times, AT_EMPTY_PATH))
            else:
                _check(_libc.utimensat(-100, _proc(node.fd).encode(), times, 0))  # AT_FDCWD
        st = os.fstat(node.fd)
        node.mode = st.st_mode
        return p.ATTR_OUT.pack(self.timeout, 0, 0) + self._attr(st)

    def _readlink(self, request: Request) -> bytes:
        node = self._node(request.nodeid)
        if not stat.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        return _readlink_fd(node.fd)

    def _symlink(self, request: Request) -> bytes:
        self._writable()
        name, target = request.names(count=2)
        name = self._name(name)
        parent = self._node(request.nodeid)
        os.symlink(target, name, dir_fd=parent.fd)
        self._owner(parent, name, request)
        return self._entry(parent, name)

    def _mknod(self, request: Request) -> bytes:
        self._writable()
        mode, rdev, umask, _ = request.args(p.MKNOD_IN)
        name = self._name(request.names(p.MKNOD_IN.size)[0])
        parent = self._node(request.nodeid)
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise OSError(errno.EPERM, "no device nodes in a shared folder")
        perms = stat.S_IMODE(mode) & ~umask & MODE_SAFE_MASK
        if kind == stat.S_IFREG:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             perms, dir_fd=parent.fd))
        else:
            os.mknod(name, kind | perms, dir_fd=parent.fd)
        self._owner(parent, name, request)
        entry = self._entry(parent, name)
        self._fix_mode(entry, perms)
        return entry

    def _fix_mode(self, entry: bytes, perms: int) -> None:
        """The process umask may have cut bits the client asked for: set them exactly."""
        node = self._nodes[p.ENTRY_OUT.unpack_from(entry)[0]]
        if stat.S_IMODE(node.mode) != perms:
            os.chmod(_proc(node.fd), perms)
            node.mode = stat.S_IFMT(node.mode) | perms

    def _mkdir(self, request: Request) -> bytes:
        self._writable()
        mode, umask = request.args(p.MKDIR_IN)
        name = self._name(request.names(p.MKDIR_IN.size)[0])
        parent = self._node(request.nodeid)
        perms = stat.S_IMODE(mode) & ~umask
        os.mkdir(name, perms, dir_fd=parent.fd)
        self._owner(parent, name, request)
        entry = self._entry(parent, name)
        self._fix_mode(entry, perms)
        return self._refresh(entry)

    def _refresh(self, entry: bytes) -> bytes:
        node = self._nodes[p.ENTRY_OUT.unpack_from(entry)[0]]
        return entry[: p.ENTRY_OUT.size] + self._attr(os.fstat(node.fd))

    def _unlink(self, request: Request) -> bytes:
        self._writable()
        os.unlink(self._name(request.names()[0]), dir_fd=self._node(request.nodeid).fd)
        return b""

    def _rmdir(self, request: Request) -> bytes:
        self._writable()
        os.rmdir(self._name(request.names()[0]), dir_fd=self._node(request.nodeid).fd)
        return b""

    def _rename(self, request: Request) -> bytes:
        (newdir,) = request.args(p.RENAME_IN)
        old, new = request.names(p.RENAME_IN.size, 2)
        return self._do_rename(request.nodeid, old, newdir, new, 0)

    def _rename2(self, request: Request) -> bytes:
        newdir, flags, _ = request.args(p.RENAME2_IN)
        old, new = request.names(p.RENAME2_IN.size, 2)
        return self._do_rename(request.nodeid, old, newdir, new, flags)

    def _do_rename(self, olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> bytes:
        self._writable()
        old, new = self._name(old), self._name(new)
        src, dst = self._node(olddir), self._node(newdir)
        if flags & ~(p.RENAME_NOREPLACE | p.RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        if flags:
            _check(_libc.renameat2(src.fd, old, dst.fd, new, flags))
        else:
            os.rename(old, new, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        return b""

    def _link(self, request: Request) -> bytes:
        self._writable()
        (oldnode,) = request.args(p.LINK_IN)
        name = self._name(request.names(p.LINK_IN.size)[0])
        node, parent = self._node(oldnode), self._node(request.nodeid)
        if not stat.S_ISREG(node.mode):
            raise OSError(errno.EPERM, "hard links only to regular files")
        os.link(_proc(node.fd), name, dst_dir_fd=parent.fd, follow_symlinks=True)
        return self._entry(parent, name)

    def _open(self, request: Request) -> bytes:
        if self.cache.no_open:
            # the kernel then opens files itself from now on (fc->no_open): no OPEN, no RELEASE
            raise OSError(errno.ENOSYS, "opens need no message")
        flags, _ = request.args(p.OPEN_IN)
        node = self._node(request.nodeid)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._writable()
        if stat.S_ISDIR(node.mode):
            raise OSError(errno.EISDIR, "is a directory")
        fd = self._reopen(node, flags)
        handle = self._new_handle()
        self._files[handle] = fd
        return p.OPEN_OUT.pack(handle, self.cache.file_flags, 0)

    def _create(self, request: Request) -> bytes:
        self._writable()
        flags, mode, umask, _ = request.args(p.CREATE_IN)
        name = self._name(request.names(p.CREATE_IN.size)[0])
        parent = self._node(request.nodeid)
        perms = stat.S_IMODE(mode) & ~umask & MODE_SAFE_MASK
        flags = (flags & ~(os.O_NOCTTY | os.O_PATH)) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, perms, dir_fd=parent.fd)
        try:
            self._owner(parent, name, request)
            entry = self._entry(parent, name)
            self._fix_mode(entry, perms)
            entry = self._refresh(entry)
        except BaseException:
            os.close(fd)
            raise
        if self.cache.no_open:
            # once the kernel has seen ENOSYS for OPEN it never RELEASEs a created file either:
            # keep no handle, later I/O comes by node
            os.close(fd)
            return entry + p.OPEN_OUT.pack(NO_HANDLE, self.cache.file_flags, 0)
        handle = self._new_handle()
        self._files[handle] = fd
        return entry + p.OPEN_OUT.pack(handle, self.cache.file_flags, 0)

    def _read(self, request: Request) -> bytes:
        fh, offset, size, *_ = request.args(p.READ_IN)
        with self._opened(request.nodeid, fh, os.O_RDONLY) as fd:
            return os.pread(fd, min(size, 1 << 20), offset)

    def _write(self, request: Request) -> bytes:
        self._writable()
        fh, offset, size, *_ = request.args(p.WRITE_IN)
        data = memoryview(request.body)[p.WRITE_IN.size : p.WRITE_IN.size + size]
        if len(data) != size:
            raise ProtocolError(f"WRITE of {size} bytes carries {len(data)}")
        with self._opened(request.nodeid, fh, os.O_WRONLY) as fd:
            return p.WRITE_OUT.pack(os.pwrite(fd, data, offset), 0)

    def _release(self, request: Request) -> bytes:
        fh, *_ = request.args(p.RELEASE_IN)
        with self._lock:
            fd = self._files.pop(fh, None)
        if fd is not None:
            os.close(fd)
        return b""

    def _fsync(self, request: Request) -> bytes:
        fh, flags, _ = request.args(p.FSYNC_IN)
        with self._opened(request.nodeid, fh, os.O_RDONLY) as fd:
            (os.fdatasync if flags & p.FSYNC_FDATASYNC else os.fsync)(fd)
        return b""

    def _opendir(self, request: Request) -> bytes:
        if self.cache.no_open:
            # the kernel then opens directories itself (fc->no_opendir), caching their listings
            # (FOPEN_CACHE_DIR is its default then); READDIR comes with handle 0 and the node id
            raise OSError(errno.ENOSYS, "opendirs need no message")
        node = self._node(request.nodeid)
        if not stat.S_ISDIR(node.mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        fd = self._reopen(node, os.O_RDONLY | os.O_DIRECTORY)
        try:
            handle = DirHandle(fd, _scan(fd))
        except BaseException:
            os.close(fd)
            raise
        number = self._new_handle()
        self._dirs[number] = handle
        return p.OPEN_OUT.pack(number, self.cache.dir_flags, 0)

    def _listing(self, nodeid: int, fh: int, offset: int) -> tuple[list[tuple[bytes, int, int]], int]:
        """(entries, a directory fd to look them up from) for READDIR/READDIRPLUS. Handle 0
        (no OPENDIR): the node's listing, read afresh at offset 0 and kept for the later
        offsets until the reply past its end; names are looked up from the node's own fd,
        so no fd of a listing can be closed under another request."""
        if fh != NO_HANDLE or not self.cache.no_open:
            handle = self._dirs.get(fh)
            if handle is None:
                raise OSError(errno.EBADF, "unknown directory handle")
            return handle.entries, handle.fd
        node = self._node(nodeid)
        if not stat.S_ISDIR(node.mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        with self._lock:
            entries = self._listings.get(nodeid)
        if entries is None or offset == 0:
            fd = self._reopen(node, os.O_RDONLY | os.O_DIRECTORY)
            try:
                entries = _scan(fd)
            finally:
                os.close(fd)
            with self._lock:
                self._listings[nodeid] = entries
        elif offset >= len(entries):
            with self._lock:
                self._listings.pop(nodeid, None)
        return entries, node.fd

    def _readdir(self, request: Request) -> bytes:
        fh, offset, size, *_ = request.args(p.READ_IN)
        entries, _ = self._listing(request.nodeid, fh, offset)
        out = bytearray()
        for index in range(offset, len(entries)):
            name, ino, kind = entries[index]
            entry = p.dirent(ino, index + 1, kind, name)
            if len(out) + len(entry) > size:
                break
            out += entry
        return bytes(out)

    def _readdirplus(self, request: Request) -> bytes:
        """READDIR with each entry's LOOKUP answer: the kernel adds one lookup per entry with
        a node id (and forgets it again if it cannot use the entry), so a node is remembered
        only for entries that go into the reply."""
        fh, offset, size, *_ = request.args(p.READ_IN)
        entries, dir_fd = self._listing(request.nodeid, fh, offset)
        no_entry = p.ENTRY_OUT.pack(0, 0, 0, 0, 0, 0) + bytes(p.ATTR.size)
        out = bytearray()
        for index in range(offset, len(entries)):
            name, ino, kind = entries[index]
            found = None if name in (b".", b"..") else self._stat_entry(dir_fd, name)
            entry = p.direntplus(no_entry, ino, index + 1, kind, name)  # node id 0: no attributes
            if len(out) + len(entry) > size:
                if found is not None:
                    os.close(found[0])
                break
            if found is not None:  # gone meanwhile: listed without attributes
                fd, st = found
                node = self._remember(fd, st)
                entry_out = p.ENTRY_OUT.pack(node.nodeid, 0, self.timeout, self.timeout, 0, 0) + self._attr(st)
                entry = p.direntplus(entry_out, st.st_ino, index + 1, stat.S_IFMT(st.st_mode) >> 12, name)
            out += entry
        return bytes(out)

    @staticmethod
    def _stat_entry(dir_fd: int, name: bytes) -> tuple[int, os.stat_result] | None:
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return None
        try:
            return fd, os.fstat(fd)
        except OSError:
            os.close(fd)
            return None

    def _releasedir(self, request: Request) -> bytes:
        fh, *_ = request.args(p.RELEASE_IN)
        with self._lock:
            handle = self._dirs.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)
        return b""

    def _fsyncdir(self, request: Request) -> bytes:
        fh, *_ = request.args(p.FSYNC_IN)
        if fh == NO_HANDLE and self.cache.no_open:
            fd = self._reopen(self._node(request.nodeid), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return b""
        handle = self._dirs.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "unknown directory handle")
        os.fsync(handle.fd)
        return b""

    def _statfs(self, request: Request) -> bytes:
        s = os.fstatvfs(self._node(ROOT_ID).fd)
        return p.KSTATFS.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                              s.f_bsize, s.f_namemax, s.f_frsize, 0)


def _readlink_fd(fd: int) -> bytes:
    """readlinkat(fd, "") reads the symlink an O_PATH fd names (Linux ≥ 2.6.39)."""
    buffer = ctypes.create_string_buffer(4096)
    length = _libc.readlinkat(fd, b"", buffer, len(buffer))
    _check(length)
    return buffer.raw[:length]


def _scan(fd: int) -> list[tuple[bytes, int, int]]:
    """A directory's entries (name, inode, d_type), "." and ".." first (offsets 1 and 2)."""
    entries = [(b".", os.fstat(fd).st_ino, stat.S_IFDIR >> 12), (b"..", 1, stat.S_IFDIR >> 12)]
    with os.scandir(fd) as scan:
        for entry in scan:
            entries.append((os.fsencode(entry.name), entry.inode(), _dtype(entry)))
    return entries


def _dtype(entry: os.DirEntry) -> int:
    try:
        if entry.is_symlink():
            return stat.S_IFLNK >> 12
        if entry.is_dir(follow_symlinks=False):
            return stat.S_IFDIR >> 12
        if entry.is_file(follow_symlinks=False):
            return stat.S_IFREG >> 12
    except OSError:
        pass
    return 0  # DT_UNKNOWN: the client asks with LOOKUP
