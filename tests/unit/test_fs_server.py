"""The FUSE-protocol file server, driven with requests built byte for byte the way the kernel
sends them (no mount, no kernel client): answers, errors, and every way out of the share."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vmctl.fs import protocol as p
from vmctl.fs.server import NO_HANDLE, ROOT_ID, FileServer


class Client:
    """Speaks to a FileServer the way the kernel would (one request at a time)."""

    def __init__(self, server: FileServer) -> None:
        self.server = server
        self.unique = 0

    def call(self, opcode: int, nodeid: int, body: bytes = b"", uid: int = 0, gid: int = 0) -> tuple[int, bytes]:
        self.unique += 1
        data = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, self.unique, nodeid, uid, gid, 1, 0, 0) + body
        answer = self.server.handle(data)
        if answer is None:
            return 0, b""
        length, error, unique = p.OUT_HEADER.unpack_from(answer)
        assert unique == self.unique and length == len(answer)
        return -error, answer[p.OUT_HEADER.size :]

    def ok(self, opcode: int, nodeid: int, body: bytes = b"", **kw) -> bytes:
        error, payload = self.call(opcode, nodeid, body, **kw)
        assert error == 0, f"opcode {opcode}: {os.strerror(error)}"
        return payload

    def init(self) -> bytes:
        return self.ok(p.INIT, 0, p.INIT_IN.pack(7, 38, 131072, 0xFFFFFFFF) + bytes(48))

    def lookup(self, parent: int, name: bytes) -> tuple[int, tuple]:
        error, payload = self.call(p.LOOKUP, parent, name + b"\0")
        if error:
            return error, ()
        return p.ENTRY_OUT.unpack_from(payload)[0], p.ATTR.unpack_from(payload, p.ENTRY_OUT.size)

    def open(self, nodeid: int, flags: int) -> tuple[int, int]:
        """(errno, handle); ENOSYS is what the kernel takes as "open without a message": handle 0."""
        error, payload = self.call(p.OPEN, nodeid, p.OPEN_IN.pack(flags, 0))
        if error == errno.ENOSYS:
            return 0, NO_HANDLE
        return error, (p.OPEN_OUT.unpack_from(payload)[0] if not error else 0)

    def create(self, parent: int, name: bytes, mode: int = 0o644, flags: int = os.O_RDWR, uid: int = 0) -> tuple[int, int]:
        payload = self.ok(p.CREATE, parent, p.CREATE_IN.pack(flags, stat.S_IFREG | mode, 0o022, 0) + name + b"\0", uid=uid)
        return p.ENTRY_OUT.unpack_from(payload)[0], p.OPEN_OUT.unpack_from(payload, p.ENTRY_OUT.size + p.ATTR.size)[0]

    def write(self, fh: int, data: bytes, offset: int = 0, nodeid: int = 0) -> int:
        payload = self.ok(p.WRITE, nodeid, p.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data)
        return p.WRITE_OUT.unpack(payload)[0]

    def read(self, fh: int, size: int, offset: int = 0, nodeid: int = 0) -> bytes:
        return self.ok(p.READ, nodeid, p.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))


@pytest.fixture
def share(tmp_path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    (root / "hello.txt").write_text("hello\n")
    (root / "dir").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret\n")
    return root


@pytest.fixture
def client(share):
    server = FileServer(share)
    client = Client(server)
    client.init()
    yield client
    server.close()


def test_init_negotiates_our_minor_and_the_common_flags(client):
    major, minor, _, flags, _, _, max_write, *_ = p.INIT_OUT.unpack(client.init())
    assert (major, minor) == (7, 31)
    assert flags & p.BIG_WRITES and flags & p.MAX_PAGES and max_write == 128 * 1024
    # pages kept across opens, dropped when the client sees another mtime or size
    assert flags & p.AUTO_INVAL_DATA
    # listings carry attributes (READDIRPLUS, every time: not _AUTO)
    assert flags & p.DO_READDIRPLUS
    # no OPEN messages in `auto`: O_TRUNC must then come as SETATTR, so no ATOMIC_O_TRUNC
    assert not flags & ~(p.ASYNC_READ | p.BIG_WRITES | p.PARALLEL_DIROPS | p.MAX_PAGES
                         | p.AUTO_INVAL_DATA | p.DO_READDIRPLUS)


def entry_timeouts(payload: bytes) -> tuple[int, int]:
    return p.ENTRY_OUT.unpack_from(payload)[2:4]


@pytest.mark.parametrize("mode, timeout, no_open", [("auto", 1, True), ("always", 86400, True), ("never", 0, False)])
def test_cache_modes_set_timeouts_opens_and_flags(share, mode, timeout, no_open):
    client = Client(FileServer(share, cache=mode))
    flags = p.INIT_OUT.unpack(client.init())[3]
    assert bool(flags & p.ATOMIC_O_TRUNC) is not no_open  # O_TRUNC done by OPEN only when OPEN is sent
    assert entry_timeouts(client.ok(p.LOOKUP, ROOT_ID, b"hello.txt\0")) == (timeout, timeout)
    nodeid, _ = client.lookup(ROOT_ID, b"hello.txt")
    assert p.ATTR_OUT.unpack_from(client.ok(p.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0)))[0] == timeout
    error, payload = client.call(p.OPEN, nodeid, p.OPEN_IN.pack(os.O_RDONLY, 0))
    if no_open:  # ENOSYS: the kernel opens files itself from now on, keeping their pages
        assert error == errno.ENOSYS
        assert client.read(NO_HANDLE, 100, nodeid=nodeid) == b"hello\n"
    else:  # nothing cached: every read goes to the file
        assert error == 0 and p.OPEN_OUT.unpack_from(payload)[1] == p.FOPEN_DIRECT_IO
    error, opened = client.call(p.OPENDIR, ROOT_ID, p.OPEN_IN.pack(os.O_RDONLY, 0))
    if no_open:  # likewise for directories: the kernel then caches listings (FOPEN_CACHE_DIR)
        assert error == errno.ENOSYS
    else:
        assert error == 0 and p.OPEN_OUT.unpack_from(opened)[1] == 0
    # closes cost nothing: FLUSH stays ENOSYS (the kernel stops sending it)
    assert client.call(p.FLUSH, nodeid, p.FLUSH_IN.pack(0, 0, 0, 0))[0] == errno.ENOSYS
    client.server.close()


def test_cache_mode_is_checked(share):
    with pytest.raises(ValueError, match="cache mode 'sometimes': expected one of auto, always, never"):
        FileServer(share, cache="sometimes")


def test_without_open_messages_io_goes_by_node(client, share):
    """After ENOSYS for OPEN the kernel sends READ/WRITE/FSYNC with handle 0 and never RELEASEs
    a created file either: CREATE keeps no handle, I/O opens the node's inode per request."""
    nodeid, fh = client.create(ROOT_ID, b"made", 0o600, flags=os.O_WRONLY | os.O_EXCL)
    assert fh == NO_HANDLE
    assert client.write(NO_HANDLE, b"by node", nodeid=nodeid) == 7
    client.ok(p.FSYNC, nodeid, p.FSYNC_IN.pack(NO_HANDLE, 0, 0))
    assert (share / "made").read_bytes() == b"by node"
    assert client.read(NO_HANDLE, 3, 3, nodeid=nodeid) == b"nod"
    # O_TRUNC arrives as SETATTR(size) without FATTR_FH
    client.ok(p.SETATTR, nodeid, p.SETATTR_IN.pack(p.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    assert (share / "made").read_bytes() == b""
    # a directory or an unknown node has no handle-less I/O
    dir_id, _ = client.lookup(ROOT_ID, b"dir")
    assert client.call(p.READ, dir_id, p.READ_IN.pack(NO_HANDLE, 0, 10, 0, 0, 0, 0))[0] == errno.EBADF
    assert client.call(p.READ, 999, p.READ_IN.pack(NO_HANDLE, 0, 10, 0, 0, 0, 0))[0] == errno.ESTALE


def read_plus(client: Client, nodeid: int, fh: int, size: int = 4096) -> list[tuple[bytes, int, tuple]]:
    """(name, node id, attributes) of every READDIRPLUS entry, across buffers of `size`."""
    found, offset = [], 0
    while data := client.ok(p.READDIRPLUS, nodeid, p.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)):
        position = 0
        while position < len(data):
            node = p.ENTRY_OUT.unpack_from(data, position)[0]
            attr = p.ATTR.unpack_from(data, position + p.ENTRY_OUT.size)
            position += p.ENTRY_OUT.size + p.ATTR.size
            ino, offset, namelen, kind = p.DIRENT.unpack_from(data, position)
            found.append((data[position + p.DIRENT.size : position + p.DIRENT.size + namelen], node, attr))
            position += (p.DIRENT.size + namelen + 7) & ~7
    return found


def test_readdirplus_answers_each_names_lookup(client, share):
    for index in range(30):
        (share / f"file-{index:02d}").write_text("x" * index)
    fh = opendir(client, ROOT_ID)
    assert fh == NO_HANDLE  # `auto`: listed by node
    entries = read_plus(client, ROOT_ID, fh, size=700)  # a few entries per reply
    names = [name for name, _, _ in entries]
    assert sorted(names) == sorted([b".", b"..", b"hello.txt", b"dir"] + [b"file-%02d" % i for i in range(30)])
    by_name = {name: (node, attr) for name, node, attr in entries}
    assert by_name[b"."][0] == 0 and by_name[b".."][0] == 0  # no attributes: the kernel skips them
    node, attr = by_name[b"file-07"]
    assert attr[1] == 7 and attr[0] == os.stat(share / "file-07").st_ino
    assert client.lookup(ROOT_ID, b"file-07")[0] == node  # the same node a LOOKUP gives
    # each listed entry counted one lookup: forgetting it twice (listing + LOOKUP) drops the node
    client.call(p.FORGET, node, p.FORGET_IN.pack(2))
    assert client.call(p.GETATTR, node, p.GETATTR_IN.pack(0, 0, 0))[0] == errno.ESTALE


def test_listing_by_node_is_read_afresh_at_offset_zero(client, share):
    """Without OPENDIR a listing is the node's: kept across the offsets of one pass, read
    again when a pass starts over (another writer's new file shows)."""
    def names() -> list[bytes]:
        return sorted(name for name, _, _ in read_plus(client, ROOT_ID, NO_HANDLE, size=300))

    assert names() == [b".", b"..", b"dir", b"hello.txt"]
    (share / "added").write_text("x")
    assert names() == [b".", b"..", b"added", b"dir", b"hello.txt"]
    client.ok(p.FSYNCDIR, ROOT_ID, p.FSYNC_IN.pack(NO_HANDLE, 0, 0))
    file_id, _ = client.lookup(ROOT_ID, b"hello.txt")
    assert client.call(p.READDIR, file_id, p.READ_IN.pack(NO_HANDLE, 0, 4096, 0, 0, 0, 0))[0] == errno.ENOTDIR


def test_lookup_getattr_read(client, share):
    nodeid, attr = client.lookup(ROOT_ID, b"hello.txt")
    assert attr[1] == 6 and stat.S_ISREG(attr[9]) and attr[0] == os.stat(share / "hello.txt").st_ino
    assert client.lookup(ROOT_ID, b"hello.txt")[0] == nodeid  # one node per inode
    error, fh = client.open(nodeid, os.O_RDONLY)
    assert error == 0
    assert client.read(fh, 100, nodeid=nodeid) == b"hello\n" and client.read(fh, 100, 3, nodeid=nodeid) == b"lo\n"
    assert client.lookup(ROOT_ID, b"missing") == (errno.ENOENT, ())


@pytest.mark.parametrize("mode", ["never", "auto"])
def test_create_write_rename_unlink(share, mode):
    client = Client(FileServer(share, cache=mode))
    client.init()
    nodeid, fh = client.create(ROOT_ID, b"new", 0o640)
    assert client.write(fh, b"abc" * 1000, nodeid=nodeid) == 3000
    client.ok(p.RELEASE, nodeid, p.RELEASE_IN.pack(fh, 0, 0, 0))
    assert (share / "new").read_bytes() == b"abc" * 1000
    assert stat.S_IMODE(os.stat(share / "new").st_mode) == 0o640
    dir_id, _ = client.lookup(ROOT_ID, b"dir")
    client.ok(p.RENAME, ROOT_ID, p.RENAME_IN.pack(dir_id) + b"new\0moved\0")
    assert (share / "dir" / "moved").exists() and not (share / "new").exists()
    client.ok(p.UNLINK, dir_id, b"moved\0")
    assert not (share / "dir" / "moved").exists()


def test_new_files_belong_to_the_caller(client, share):
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    client.create(ROOT_ID, b"owned", uid=1234)
    assert os.stat(share / "owned").st_uid == 1234


def opendir(client: Client, nodeid: int) -> int:
    """The handle READDIR takes: OPENDIR's, or 0 when the server wants no OPENDIR (ENOSYS)."""
    error, payload = client.call(p.OPENDIR, nodeid, p.OPEN_IN.pack(os.O_RDONLY, 0))
    if error == errno.ENOSYS:
        return NO_HANDLE
    assert error == 0
    return p.OPEN_OUT.unpack_from(payload)[0]


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_readdir_lists_every_entry_once_across_small_buffers(share, mode):
    client = Client(FileServer(share, cache=mode))
    client.init()
    for index in range(50):
        (share / f"file-{index:02d}").write_text("x")
    fh = opendir(client, ROOT_ID)
    names, offset = [], 0
    while True:
        data = client.ok(p.READDIR, ROOT_ID, p.READ_IN.pack(fh, offset, 200, 0, 0, 0, 0))
        if not data:
            break
        position = 0
        while position < len(data):
            ino, offset, namelen, kind = p.DIRENT.unpack_from(data, position)
            names.append(data[position + p.DIRENT.size : position + p.DIRENT.size + namelen].decode())
            position += (p.DIRENT.size + namelen + 7) & ~7
    assert sorted(names) == sorted([".", "..", "hello.txt", "dir"] + [f"file-{i:02d}" for i in range(50)])


@pytest.mark.parametrize("name", [b"..", b".", b"../outside", b"dir/../../outside", b"/etc", b""])
def test_names_that_leave_a_directory_are_refused(client, name):
    assert client.lookup(ROOT_ID, name)[0] == errno.EACCES
    error, _ = client.call(p.CREATE, ROOT_ID, p.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + name + b"\0")
    assert error == errno.EACCES
    error, _ = client.call(p.MKDIR, ROOT_ID, p.MKDIR_IN.pack(0o755, 0) + name + b"\0")
    assert error == errno.EACCES


def test_a_symlink_out_is_never_followed_by_the_server(client, share, tmp_path):
    os.symlink(tmp_path / "outside", share / "out")
    os.symlink(tmp_path / "outside" / "secret", share / "secret-link")
    out_id, attr = client.lookup(ROOT_ID, b"out")
    assert stat.S_ISLNK(attr[9])  # the link itself, not the directory it points to
    assert client.lookup(out_id, b"secret")[0] == errno.ENOTDIR  # an O_PATH symlink is no directory fd
    assert client.ok(p.READLINK, out_id) == os.fsencode(tmp_path / "outside")
    link_id, _ = client.lookup(ROOT_ID, b"secret-link")
    assert client.call(p.READ, link_id, p.READ_IN.pack(NO_HANDLE, 0, 10, 0, 0, 0, 0))[0] == errno.EBADF
    assert client.call(p.WRITE, link_id, p.WRITE_IN.pack(NO_HANDLE, 0, 1, 0, 0, 0, 0) + b"x")[0] == errno.EBADF
    opener = Client(FileServer(share, cache="never"))  # a mode with OPEN messages
    opener.init()
    link_id, _ = opener.lookup(ROOT_ID, b"secret-link")
    assert opener.open(link_id, os.O_RDONLY)[0] == errno.EACCES
    assert opener.open(link_id, os.O_WRONLY | os.O_TRUNC)[0] == errno.EACCES
    opener.server.close()
    error, _ = client.call(p.SETATTR, link_id, p.SETATTR_IN.pack(p.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o777, 0, 0, 0, 0))
    assert error == errno.EOPNOTSUPP
    error, _ = client.call(p.SETATTR, link_id, p.SETATTR_IN.pack(p.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    assert error == errno.EINVAL
    error, _ = client.call(p.LINK, ROOT_ID, p.LINK_IN.pack(link_id) + b"hard\0")
    assert error == errno.EPERM
    assert (tmp_path / "outside" / "secret").read_text() == "secret\n"
    assert stat.S_IMODE(os.stat(tmp_path / "outside" / "secret").st_mode) == 0o644


def test_a_directory_replaced_by_a_symlink_after_lookup_keeps_writes_inside(client, share, tmp_path):
    """check-then-use: the client looked up `dir`, then someone swaps it for a symlink out."""
    dir_id, _ = client.lookup(ROOT_ID, b"dir")
    os.rename(share / "dir", share / "dir-moved")
    os.symlink(tmp_path / "outside", share / "dir")
    client.create(dir_id, b"planted")
    assert (share / "dir-moved" / "planted").exists()
    assert not (tmp_path / "outside" / "planted").exists()


def test_unknown_nodes_and_handles(client):
    assert client.lookup(999, b"x")[0] == errno.ESTALE
    assert client.call(p.READ, 0, p.READ_IN.pack(77, 0, 10, 0, 0, 0, 0))[0] == errno.EBADF
    assert client.call(p.GETXATTR, ROOT_ID, b"\0" * 8 + b"user.x\0")[0] == errno.ENOSYS


def test_forget_releases_the_node(client):
    nodeid, _ = client.lookup(ROOT_ID, b"hello.txt")
    client.lookup(ROOT_ID, b"hello.txt")
    client.call(p.FORGET, nodeid, p.FORGET_IN.pack(1))
    assert client.call(p.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0))[0] == 0
    assert client.call(p.BATCH_FORGET, 0, p.BATCH_FORGET_IN.pack(1, 0) + p.FORGET_ONE.pack(nodeid, 1)) == (0, b"")
    assert client.call(p.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0))[0] == errno.ESTALE


def test_no_device_nodes_and_no_setuid(client, share):
    error, _ = client.call(p.MKNOD, ROOT_ID, p.MKNOD_IN.pack(stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0) + b"null\0")
    assert error == errno.EPERM and not (share / "null").exists()
    nodeid, _ = client.lookup(ROOT_ID, b"hello.txt")
    client.ok(p.SETATTR, nodeid, p.SETATTR_IN.pack(p.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o104755, 0, 0, 0, 0))
    assert stat.S_IMODE(os.stat(share / "hello.txt").st_mode) == 0o755


@pytest.mark.parametrize("mode", ["never", "auto"])
def test_read_only_refuses_every_change(share, mode):
    client = Client(FileServer(share, read_only=True, cache=mode))
    client.init()
    nodeid, _ = client.lookup(ROOT_ID, b"hello.txt")
    assert client.open(nodeid, os.O_RDONLY)[0] == 0
    assert client.open(nodeid, os.O_WRONLY)[0] == (errno.EROFS if mode == "never" else 0)
    checks = [
        (p.WRITE, nodeid, p.WRITE_IN.pack(NO_HANDLE, 0, 1, 0, 0, 0, 0) + b"x"),
        (p.CREATE, ROOT_ID, p.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + b"x\0"),
        (p.MKDIR, ROOT_ID, p.MKDIR_IN.pack(0o755, 0) + b"x\0"),
        (p.UNLINK, ROOT_ID, b"hello.txt\0"),
        (p.RENAME, ROOT_ID, p.RENAME_IN.pack(ROOT_ID) + b"hello.txt\0y\0"),
        (p.SYMLINK, ROOT_ID, b"x\0/etc\0"),
        (p.SETATTR, nodeid, p.SETATTR_IN.pack(p.FATTR_SIZE, *[0] * 15)),
    ]
    for opcode, node, body in checks:
        assert client.call(opcode, node, body)[0] == errno.EROFS, opcode
    assert sorted(os.listdir(share)) == ["dir", "hello.txt"] and (share / "hello.txt").read_text() == "hello\n"


def test_truncated_requests_are_answered_not_crashed(client):
    assert client.call(p.READ, 0, b"\0" * 4)[0] == errno.EINVAL
    assert client.call(p.LOOKUP, ROOT_ID, b"no-terminator")[0] == errno.EINVAL
    bogus = p.IN_HEADER.pack(9999, p.GETATTR, 5, ROOT_ID, 0, 0, 0, 0, 0)
    length, error, unique = p.OUT_HEADER.unpack_from(client.server.handle(bogus))
    assert error == -errno.EIO and unique == 5


def test_struct_sizes_match_linux_fuse_h(tmp_path):
    header = Path("/usr/include/linux/fuse.h")
    if not shutil.which("gcc") or not header.exists():
        pytest.skip("gcc and linux-libc-dev (/usr/include/linux/fuse.h) are needed")
    lines = ["#include <stdio.h>", "#include <linux/fuse.h>", "int main(void) {"]
    lines += [f'printf("{name} %zu\\n", sizeof(struct {name}));' for name in p.STRUCT_SIZES]
    lines += ["return 0; }"]
    (tmp_path / "sizes.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(tmp_path / "sizes"), str(tmp_path / "sizes.c")], check=True)
    output = subprocess.run([str(tmp_path / "sizes")], check=True, capture_output=True, text=True).stdout
    sizes = {name: int(size) for name, size in (line.split() for line in output.splitlines())}
    assert sizes == p.STRUCT_SIZES


def test_a_restored_server_never_reuses_the_saved_guests_numbers(share, tmp_path):
    """A clone's new server (its own folder) behind a guest restored from a snapshot: the node
    ids and handles that guest still caches must not name other files here."""
    from vmctl.virtio.fs import FsDevice

    client = Client(FileServer(share, cache="never"))  # file handles from OPEN
    client.init()
    saved_node, _ = client.lookup(ROOT_ID, b"hello.txt")
    _, saved_fh = client.open(saved_node, os.O_RDONLY)
    source = FsDevice(str(share), "t")
    source.server.close()
    source.server = client.server
    state = source.save_state()
    assert state == {"next_node": saved_node + 1, "next_handle": saved_fh + 1}

    other = tmp_path / "clone-share"
    other.mkdir()
    (other / "other.txt").write_text("not hello\n")
    clone = FsDevice(str(other), "t", cache="never")
    clone.restore_state(state)
    fresh = Client(clone.server)
    fresh.init()
    node, _ = fresh.lookup(ROOT_ID, b"other.txt")
    assert node > saved_node
    assert fresh.call(p.GETATTR, saved_node, p.GETATTR_IN.pack(0, 0, 0))[0] == errno.ESTALE
    _, fh = fresh.open(node, os.O_RDONLY)
    assert fh > saved_fh and fresh.call(p.READ, 0, p.READ_IN.pack(saved_fh, 0, 10, 0, 0, 0, 0))[0] == errno.EBADF
    clone.close()
