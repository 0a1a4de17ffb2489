"""vmctl's guest /init: its command-line parsing (run for real under busybox sh) and the
Python side of the contract (InitArgs, markers)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vmctl import guest_contract as initargs
from vmctl.errors import VmctlError
from vmctl.guest_contract import InitArgs
from vmctl.images.rootfs import INIT_SCRIPT

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
needs_busybox = pytest.mark.skipif(not Path(BUSYBOX).exists(),
                                   reason="needs busybox (apt: busybox-static)")


def parsed(tmp_path: Path, cmdline: str) -> dict[str, str]:
    """What /init makes of a kernel command line (its --print-config mode)."""
    file = tmp_path / "cmdline"
    file.write_text(cmdline + "\n")
    out = subprocess.run([BUSYBOX, "sh", str(INIT_SCRIPT), "--print-config", str(file)],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


@needs_busybox
def test_defaults_without_vmctl_words(tmp_path: Path):
    config = parsed(tmp_path, "console=ttyS0 reboot=k panic=1 root=/dev/vda")
    assert config == {"ip": "", "gw": "", "dns": "", "iface": "eth0", "hostname": "vmctl",
                      "ro": "0", "sshkey": "", "cmd": ""}


@needs_busybox
def test_python_encoding_round_trips_through_init(tmp_path: Path):
    command = "echo 'two  spaces' \"$HOME\" | tr a-z A-Z; exit 7 # *glob?"
    args = InitArgs(ip="10.0.2.15/24", gw="10.0.2.2", dns="10.0.2.3", iface="eth1",
                    hostname="guest-1", sshkey="ssh-ed25519 AAAAC3Nza me@host",
                    cmd=command, read_only=True)
    config = parsed(tmp_path, "console=ttyS0 * " + args.cmdline() + " quiet")
    assert config == {"ip": "10.0.2.15/24", "gw": "10.0.2.2", "dns": "10.0.2.3",
                      "iface": "eth1", "hostname": "guest-1", "ro": "1",
                      "sshkey": "ssh-ed25519 AAAAC3Nza me@host", "cmd": command}


@needs_busybox
def test_pmem_words_name_each_device_and_its_mount_point(tmp_path: Path):
    args = InitArgs(pmem=["/mnt/base", "/srv/two words"])
    file = tmp_path / "cmdline"
    file.write_text("console=ttyS0 " + args.cmdline() + "\n")
    out = subprocess.run([BUSYBOX, "sh", str(INIT_SCRIPT), "--print-config", str(file)],
                         capture_output=True, text=True, check=True).stdout
    assert [line for line in out.splitlines() if line.startswith("pmem=")] == [
        "pmem=/dev/pmem0 /mnt/base", "pmem=/dev/pmem1 /srv/two words"]


def test_pmem_paths_must_be_absolute():
    with pytest.raises(VmctlError, match="vmctl.pmem"):
        InitArgs(pmem=["relative"]).words()


@needs_busybox
def test_last_word_wins_and_rw_clears_ro(tmp_path: Path):
    config = parsed(tmp_path, "ro vmctl.hostname=a vmctl.hostname=b rw")
    assert config["hostname"] == "b" and config["ro"] == "0"


@needs_busybox
def test_argv_command_is_shell_quoted(tmp_path: Path):
    args = InitArgs(cmd=["python3", "-c", "print('a b')"])
    assert parsed(tmp_path, args.cmdline())["cmd"] == "python3 -c 'print('\"'\"'a b'\"'\"')'"


@needs_busybox
def test_decoded_command_runs_in_sh_with_its_exit_code(tmp_path: Path):
    # the same decode + `sh -c` that /init does, so quoting survives end to end
    args = InitArgs(cmd=["printf", "%s|", "a b", "c"])
    word = args.words()[0].split("=", 1)[1]
    script = f'/bin/sh -c "$(echo {word} | {BUSYBOX} base64 -d)"; echo " rc=$?"'
    out = subprocess.run([BUSYBOX, "sh", "-c", script], capture_output=True, text=True)
    assert out.stdout == "a b|c| rc=0\n"


def test_words_validate_values():
    with pytest.raises(VmctlError):
        InitArgs(ip="10.0.2.15").words()  # no prefix
    with pytest.raises(VmctlError):
        InitArgs(ip="10.0.2.300/24").words()
    with pytest.raises(VmctlError):
        InitArgs(gw="gateway").words()
    with pytest.raises(VmctlError):
        InitArgs(hostname="has space").words()
    assert InitArgs().words() == []
    assert all(" " not in w for w in InitArgs(cmd="a b  c", sshkey="k e y").words())


def test_markers():
    assert initargs.READY_MARKER == "VMCTL-READY"
    assert initargs.exit_code("VMCTL-EXIT 0\r\n") == 0
    assert initargs.exit_code("VMCTL-EXIT 137") == 137
    assert initargs.exit_code("VMCTL-EXIT") is None
    assert initargs.exit_code("echo VMCTL-EXIT 3") is None


def test_init_script_contract():
    text = INIT_SCRIPT.read_text()
    assert text.startswith("#!/bin/busybox sh\n")
    assert INIT_SCRIPT.stat().st_mode & 0o111
    assert 'echo "VMCTL-READY"' in text
    assert 'echo "VMCTL-EXIT $?"' in text
    assert "$BB reboot -f" in text
    for mount in ("proc /proc", "sysfs /sys", "devtmpfs /dev", "tmpfs /tmp", "tmpfs /run"):
        assert f"mount_once {mount}" in text
    assert "/usr/sbin/sshd" in text


@needs_busybox
def test_every_busybox_applet_init_calls_exists():
    # /init calls tools as `$BB applet`; an applet missing from Debian's busybox-static
    # (e.g. `mountpoint`) only shows as "applet not found" on the guest console.
    available = set(subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split())
    used = set(re.findall(r"\$BB ([a-z0-9_-]+)", INIT_SCRIPT.read_text()))
    assert used and used <= available, f"not in {BUSYBOX}: {sorted(used - available)}"


@needs_busybox
def test_is_mounted_reads_proc_mounts():
    # the function as written in /init, run against this machine's /proc/mounts
    function = re.search(r"^is_mounted\(\) \{.*?^\}$", INIT_SCRIPT.read_text(), re.M | re.S).group(0)
    script = function + "\nis_mounted /proc && echo proc; is_mounted /proc/nonexistent || echo none; is_mounted / && echo root"
    out = subprocess.run([BUSYBOX, "sh", "-c", script], capture_output=True, text=True)
    assert out.stdout.split() == ["proc", "none", "root"], out.stderr
