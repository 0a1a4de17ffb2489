"""The ssh user's set-up (guest_contract.user_setup) on the real image trees, in a chroot.

Each reference image tree is mounted as the lower layer of an overlay (the cache stays
untouched) and the set-up script runs chrooted into it, as the guest's command script runs
it after /init: the debian tree creates the user with useradd, the busybox tree (whose
busybox-static has no adduser applet) through /etc/passwd. A failure must print the
SETUP_FAILED marker with the tool's message and exit 1, never pass silently.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmctl.guest_contract import SETUP_DONE, SETUP_FAILED, user_setup
from vmctl.images import locate

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKk9l1EwzBNZ1JcVUZ3v6B+e8a9YgPEXJrT3qKz1yoT2 test"


@pytest.fixture(params=["busybox", "debian"])
def root(request, tmp_path):
    tree = locate(request.param).rootfs_tree
    if not (tree / "bin").is_dir():
        pytest.skip(f"the {request.param} tree is not built (vmctl image build --profile {request.param})")
    if os.geteuid() != 0:
        pytest.skip("needs root (overlay mount, chroot)")
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for path in (upper, work, merged):
        path.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={tree},upperdir={upper},workdir={work}",
                    str(merged)], check=True)
    try:
        (merged / "root/.ssh").mkdir(parents=True, exist_ok=True)
        (merged / "root/.ssh/authorized_keys").write_text(KEY + "\n")
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def _chroot_sh(root: Path, script: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    return subprocess.run(["chroot", str(root), "/bin/sh", "-c", script], capture_output=True, text=True,
                          env=env, timeout=60)


def test_the_user_is_created_with_the_keys_and_can_log_in_with_them(root):
    result = _chroot_sh(root, user_setup("dev"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == SETUP_DONE
    entry = next(line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("dev:"))
    uid, gid = int(entry.split(":")[2]), int(entry.split(":")[3])
    assert entry.split(":")[5] == "/home/dev"
    shadow = next(line for line in (root / "etc/shadow").read_text().splitlines() if line.startswith("dev:"))
    assert shadow.split(":")[1] == "*"  # not locked ("!"): sshd accepts its keys
    keys = root / "home/dev/.ssh/authorized_keys"
    assert keys.read_text().strip() == KEY
    assert (keys.stat().st_uid, keys.stat().st_gid) == (uid, gid)
    assert (root / "home/dev/.ssh").stat().st_uid == uid
    # Again (a reboot of a persistent disk): the user exists; nothing fails or doubles.
    again = _chroot_sh(root, user_setup("dev"))
    assert again.returncode == 0, again.stdout
    assert sum(line.startswith("dev:") for line in (root / "etc/passwd").read_text().splitlines()) == 1


def test_a_failed_set_up_says_why_and_fails(root):
    (root / "home").mkdir(exist_ok=True)
    (root / "home/dev").write_text("a file where the home folder goes\n")
    result = _chroot_sh(root, user_setup("dev") + "\necho the command ran")
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith(SETUP_FAILED + " ")]
    assert failed and "/home/dev" in failed[0], result.stdout
    assert "the command ran" not in result.stdout
