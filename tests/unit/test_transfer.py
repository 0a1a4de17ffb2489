"""`vmctl cp`'s tar streams with a stand-in guest: the "guest" is a folder on this host and its
commands run in the host's shell (the real guests are in tests/linux/inner/test_cp.py)."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from vmctl.errors import VmctlError
from vmctl.guest_contract import ExecResult
from vmctl.transfer import XFER_GUEST, Channel, copy_in, copy_out


def local_channel(root: Path, xfer: Path | None, mounted: bool = True) -> Channel:
    """Guest paths are under `root`; the transfer share (if any) is `xfer`, and the guest has it
    mounted or not."""
    def run(script: str, timeout: float) -> ExecResult:
        check = f"grep -q ' {XFER_GUEST} virtiofs ' /proc/mounts"
        script = script.replace(check, "true" if xfer is not None and mounted else "false")
        script = script.replace(XFER_GUEST, "@XFER@")
        script = re.sub(r"(?<=[ '])/(srv|tmp)\b", f"{root}/\\1", script).replace("@XFER@", str(xfer))
        done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, timeout=timeout)
        return ExecResult(done.returncode, done.stdout, done.stderr)
    return Channel(run, None, xfer)


def tree(base: Path) -> Path:
    top = base / "proj"
    (top / "sub").mkdir(parents=True)
    (top / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(top / "run.sh", 0o750)
    (top / "sub" / "data.bin").write_bytes(os.urandom(200_000))
    os.symlink("sub/data.bin", top / "link")
    os.symlink("/etc/hostname", top / "abs-link")
    return top


def same_tree(a: Path, b: Path) -> None:
    result = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert stat.S_IMODE(os.stat(b / "run.sh").st_mode) == 0o750
    assert os.readlink(b / "link") == "sub/data.bin" and os.readlink(b / "abs-link") == "/etc/hostname"


@pytest.fixture(params=["share", "agent", "share-not-mounted"])
def setup(request, tmp_path):
    """share-not-mounted: the VMM has the share but the guest's kernel or /init did not mount it."""
    guest_root = tmp_path / "guest"
    (guest_root / "srv").mkdir(parents=True)
    (guest_root / "tmp").mkdir()
    xfer = None
    if request.param.startswith("share"):
        xfer = tmp_path / "xfer"
        xfer.mkdir()
    kind = "share" if request.param == "share" else "agent"
    return local_channel(guest_root, xfer, request.param == "share"), guest_root, kind, xfer


def test_tree_in_and_out(setup, tmp_path):
    channel, guest_root, kind, xfer = setup
    source = tree(tmp_path / "host")
    assert copy_in(channel, [source], "/srv") == kind  # an existing directory: copied into it
    same_tree(source, guest_root / "srv" / "proj")
    assert copy_in(channel, [source], "/srv/renamed") == kind  # a new name
    same_tree(source, guest_root / "srv" / "renamed")
    back = tmp_path / "back"
    back.mkdir()
    assert copy_out(channel, "/srv/proj", back) == kind
    same_tree(source, back / "proj")
    assert copy_out(channel, "/srv/proj/", tmp_path / "again") == kind  # a new name on the host
    same_tree(source, tmp_path / "again")
    if xfer is not None:
        assert os.listdir(xfer) == []  # staged archives are removed


def test_names_with_braces_and_spaces(setup, tmp_path):
    channel, guest_root, kind, _ = setup
    odd = tmp_path / "host" / "a {0} b"
    odd.mkdir(parents=True)
    (odd / "{}.txt").write_text("braces")
    assert copy_in(channel, [odd], "/srv") == kind
    assert copy_out(channel, "/srv/a {0} b", tmp_path / "back") == kind
    assert (tmp_path / "back" / "{}.txt").read_text() == "braces"


def test_single_file_and_errors(setup, tmp_path):
    channel, guest_root, _, _ = setup
    (tmp_path / "f.txt").write_text("one file")
    copy_in(channel, [tmp_path / "f.txt"], "/srv/g.txt")
    assert (guest_root / "srv" / "g.txt").read_text() == "one file"
    with pytest.raises(VmctlError, match="no such file"):
        copy_in(channel, [tmp_path / "missing"], "/srv")
    with pytest.raises(VmctlError):
        copy_out(channel, "/srv/missing", tmp_path / "x")
    with pytest.raises(VmctlError, match="no such directory"):
        copy_out(channel, "/srv/g.txt", tmp_path / "no" / "dir" / "x")


def test_a_hostile_archive_from_the_guest_stays_in_the_destination(tmp_path):
    """A guest answers `tar -c` with whatever it likes: links out, absolute and .. names."""
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        link = tarfile.TarInfo("x/out")
        link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path / "victim")
        tar.addfile(link)
        payload = b"pwned"
        for name in ("x/out/planted", "x/../../escaped"):
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    (tmp_path / "victim").mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()

    def run(script: str, timeout: float) -> ExecResult:
        import base64
        return ExecResult(0, base64.b64encode(evil.getvalue()), b"")

    with pytest.raises((tarfile.TarError, VmctlError)):
        copy_out(Channel(run), "/x", dest)
    assert os.listdir(tmp_path / "victim") == [] and not (tmp_path / "escaped").exists()
