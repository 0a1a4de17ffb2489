"""vmctl's file server mounted on the host through /dev/fuse and used by ordinary tools: the
host kernel's FUSE client is the same protocol client a guest's virtiofs driver is."""

from __future__ import annotations

import collections
import errno
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vmctl.fs import protocol as p
from vmctl.fs.hostmount import HostMount, mounted
from vmctl.fs.server import FileServer

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="FUSE mounts need root and /dev/fuse")


@pytest.fixture
def dirs(tmp_path):
    source, mnt, outside = tmp_path / "source", tmp_path / "mnt", tmp_path / "outside"
    for folder in (source, mnt, outside):
        folder.mkdir()
    (outside / "secret").write_text("secret\n")
    return source, mnt, outside


@pytest.fixture(params=["auto", "always", "never"])
def mount(dirs, request):
    """The share in each cache mode (docs/sharing.md): every tool test runs against all three."""
    source, mnt, _ = dirs
    with HostMount(FileServer(source, cache=request.param), mnt) as host:
        yield host
    assert not mounted(mnt)


class Counted:
    """Counts the requests the kernel sends (by opcode) while it serves."""

    def __init__(self, server: FileServer) -> None:
        self.seen: collections.Counter[int] = collections.Counter()
        handle = server.handle

        def counting(data: bytes | memoryview) -> bytes | None:
            self.seen[p.IN_HEADER.unpack_from(data)[1]] += 1
            return handle(data)

        server.handle = counting  # type: ignore[method-assign]


def run(command: str, cwd: Path) -> str:
    result = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def test_tar_round_trip_of_a_source_tree(mount, dirs, tmp_path):
    source, mnt, _ = dirs
    run(f"tar -C {REPO} -cf - vmctl docs | tar -C {mnt} -xpf -", tmp_path)
    (tmp_path / "back").mkdir()
    run(f"tar -C {mnt} -cf - . | tar -C {tmp_path / 'back'} -xpf -", tmp_path)
    run(f"diff -r {REPO / 'vmctl'} {tmp_path / 'back' / 'vmctl'} -x __pycache__", tmp_path)
    run(f"diff -r {REPO / 'docs'} {source / 'docs'}", tmp_path)  # what the server wrote is the real thing


def test_git_init_add_commit(mount, dirs):
    source, mnt, _ = dirs
    shutil.copytree(REPO / "vmctl" / "fs", mnt / "fs")
    env = "git -c user.email=t@example.org -c user.name=t"
    run(f"git init -q . && {env} add -A && {env} commit -qm first && {env} mv fs/server.py fs/s.py && "
        f"{env} commit -qm rename && git fsck --strict", mnt)
    assert run("git log --oneline | wc -l", source).strip() == "2"


def test_file_operations_seen_on_the_host(mount, dirs):
    source, mnt, _ = dirs
    (mnt / "a").write_bytes(b"0123456789")
    os.rename(mnt / "a", mnt / "b")
    os.link(mnt / "b", mnt / "hard")
    os.symlink("b", mnt / "soft")
    os.chmod(mnt / "b", 0o600)
    os.truncate(mnt / "b", 4)
    with open(mnt / "b", "r+b") as handle:
        handle.seek(2)
        handle.write(b"XY")
        handle.flush()
        os.fsync(handle.fileno())
    os.mkdir(mnt / "d", 0o750)
    os.utime(mnt / "d", (1_000_000_000, 1_000_000_000))
    assert (source / "b").read_bytes() == b"01XY" and (source / "hard").read_bytes() == b"01XY"
    assert os.stat(source / "b").st_nlink == 2 and os.readlink(source / "soft") == "b"
    assert stat.S_IMODE(os.stat(source / "b").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(source / "d").st_mode) == 0o750 and os.stat(source / "d").st_mtime == 1_000_000_000
    assert (mnt / "soft").read_bytes() == b"01XY"
    os.replace(mnt / "hard", mnt / "d" / "hard")
    os.unlink(mnt / "soft")
    os.unlink(mnt / "d" / "hard")
    os.rmdir(mnt / "d")
    assert sorted(os.listdir(source)) == ["b"]


def test_changes_on_the_host_side_show_through(mount, dirs):
    """Another writer's change (here the host's): at once with `never`, within about a second
    with `auto`. `always` may keep what it saw for up to a day (the trade-off it is chosen
    for), so only its own writes are checked there."""
    source, mnt, _ = dirs
    mode = mount.server.cache.mode
    (source / "late").write_text("one")
    assert (mnt / "late").read_text() == "one"
    (source / "late").write_text("two, longer")
    (source / "new").write_text("new")
    assert (mnt / "new").read_text() == "new"  # a name never seen is looked up in every mode
    if mode == "never":
        assert (mnt / "late").read_text() == "two, longer"
    elif mode == "auto":
        deadline = time.monotonic() + 5
        while (mnt / "late").read_text() != "two, longer":  # attributes are cached for 1 s
            assert time.monotonic() < deadline
            time.sleep(0.2)
    # the client's own writes are seen by itself and the host in every mode
    (mnt / "late").write_text("three")
    assert (mnt / "late").read_text() == "three" == (source / "late").read_text()


def test_cached_walk_sends_no_file_requests(dirs):
    """`always`: a walk + read of an unchanged tree, once warm, is served by the kernel's caches
    alone (names, attributes, pages, listings; opens and closes need no message); `auto` still
    reads no data and opens nothing, but looks names up again once their second has passed."""
    source, mnt, _ = dirs
    shutil.copytree(REPO / "vmctl" / "fs", source / "fs")
    walk = "find fs -type f | xargs md5sum"
    for mode in ("always", "auto"):
        server = FileServer(source, cache=mode)
        counted = Counted(server)
        with HostMount(server, mnt):
            first = run(walk, mnt)
            # the first walk's reads mark atimes stale (the kernel asks for them once more)
            assert run(walk, mnt) == first
            counted.seen.clear()
            assert run(walk, mnt) == first
            seen = set(counted.seen)
        assert not seen & {p.OPEN, p.READ, p.FLUSH, p.RELEASE, p.OPENDIR, p.RELEASEDIR}, (mode, seen)
        if mode == "always":
            assert not seen & {p.LOOKUP, p.GETATTR, p.READDIR, p.READDIRPLUS}, seen


def test_concurrent_writers(mount, dirs):
    source, mnt, _ = dirs
    block = 64 * 1024
    with open(mnt / "shared", "wb") as handle:
        handle.truncate(8 * block)

    def writer(index: int) -> None:
        fd = os.open(mnt / "shared", os.O_WRONLY)
        try:
            for _ in range(5):
                os.pwrite(fd, bytes([65 + index]) * block, index * block)
        finally:
            os.close(fd)
        (mnt / f"own-{index}").write_bytes(bytes([index]) * 100_000)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    data = (source / "shared").read_bytes()
    assert data == b"".join(bytes([65 + i]) * block for i in range(8))
    assert all((source / f"own-{i}").read_bytes() == bytes([i]) * 100_000 for i in range(8))


def test_escape_attempts(mount, dirs):
    source, mnt, outside = dirs
    (mnt / "inside").write_text("x")
    # hard link and rename to outside the mount: the kernel refuses across file systems
    with pytest.raises(OSError) as link_error:
        os.link(mnt / "inside", outside / "linked")
    with pytest.raises(OSError) as rename_error:
        os.rename(mnt / "inside", outside / "moved")
    assert link_error.value.errno == errno.EXDEV and rename_error.value.errno == errno.EXDEV
    # check-then-use race: hold a directory, swap it on the host for a symlink to outside,
    # then create through the held directory: the file lands in the directory we held
    os.mkdir(mnt / "d")
    held = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(source / "d", source / "d-moved")
        os.symlink(outside, source / "d")
        fd = os.open("planted", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=held)
        os.write(fd, b"planted")
        os.close(fd)
    finally:
        os.close(held)
    assert (source / "d-moved" / "planted").read_bytes() == b"planted"
    assert sorted(os.listdir(outside)) == ["secret"]
    # a symlink inside the share is handed to the client, never followed by the server
    os.symlink(outside / "secret", source / "link-out")
    assert os.readlink(mnt / "link-out") == str(outside / "secret")
    # device nodes cannot be created
    with pytest.raises(OSError) as mknod_error:
        os.mknod(mnt / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert mknod_error.value.errno == errno.EPERM
    assert (outside / "secret").read_text() == "secret\n"


def test_read_only_mount(dirs):
    source, mnt, _ = dirs
    (source / "f").write_text("keep")
    with HostMount(FileServer(source, read_only=True), mnt):
        assert (mnt / "f").read_text() == "keep"
        for action in (lambda: (mnt / "f").write_text("x"), lambda: (mnt / "new").write_text("x"),
                       lambda: os.unlink(mnt / "f"), lambda: os.mkdir(mnt / "d")):
            with pytest.raises(OSError) as error:
                action()
            assert error.value.errno == errno.EROFS
    assert os.listdir(source) == ["f"] and (source / "f").read_text() == "keep"


def test_cli_mount_detach_and_umount(vmctl_cli, dirs):
    source, mnt, _ = dirs
    (source / "f").write_text("via cli")
    result = vmctl_cli("share", "mount", "--detach", str(source), str(mnt))
    assert result.returncode == 0, result.stderr
    try:
        assert (mnt / "f").read_text() == "via cli"
    finally:
        result = vmctl_cli("share", "umount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert not mounted(mnt)
    deadline = time.monotonic() + 5
    while subprocess.run(["pgrep", "-f", f"share mount --detach {source}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the share server did not exit after umount"
        time.sleep(0.1)


@pytest.mark.parametrize("problem", ["missing", "file", "inside"])
def test_cli_bad_source_is_one_line(vmctl_cli, dirs, problem):
    source, mnt, _ = dirs
    (source / "file").write_text("x")
    args = {"missing": (str(source / "nope"), str(mnt)), "file": (str(source / "file"), str(mnt)),
            "inside": (str(source), str(source))}[problem]
    result = vmctl_cli("share", "mount", "--detach", *args)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "vmctl: error:" in result.stderr
    assert not mounted(mnt) and not mounted(source)
