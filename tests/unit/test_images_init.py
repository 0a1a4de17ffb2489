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
    pairs = [line.split("=", 1) for line in out.splitlines()]
    config = {key: value for key, value in pairs if key != "mount"}
    mounts = [value for key, value in pairs if key == "mount"]  # one line per vmctl.mount= word
    return {**config, "mounts": mounts} if mounts else config


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
def test_every_mount_word_is_kept_in_order(tmp_path: Path):
    args = InitArgs(mounts=[("virtiofs", "vmctl-xfer", "/run/vmctl/xfer", False),
                            ("9p", "m0", "/with space/and,comma", True), ("virtiofs", "m1", "/srv", False)])
    config = parsed(tmp_path, "console=ttyS0 " + args.cmdline() + " ro")
    assert config["mounts"] == ["virtiofs vmctl-xfer /run/vmctl/xfer rw", "9p m0 /with space/and,comma ro",
                                "virtiofs m1 /srv rw"]
    assert config["ro"] == "1"


@needs_busybox
def test_malformed_mount_words_are_reported_not_guessed(tmp_path: Path):
    relative = initargs.encode("relative")
    config = parsed(tmp_path, f"vmctl.mount=virtiofs vmctl.mount=virtiofs,t,{relative},rw "
                              f"vmctl.mount=virtiofs,t,{initargs.encode('/x')},rwx vmctl.mount=virtiofs,t,!!,ro")
    assert config["mounts"] == ["bad virtiofs", f"bad virtiofs,t,{relative},rw",
                                f"bad virtiofs,t,{initargs.encode('/x')},rwx", "bad virtiofs,t,!!,ro"]


@needs_busybox
def test_a_failed_mount_is_printed_and_boot_goes_on(tmp_path: Path):
    # mount_share as written in /init, with `mount` failing and `mkdir` working in tmp_path
    text = INIT_SCRIPT.read_text()
    functions = "".join(re.search(rf"^{name}\(\) \{{.*?^\}}$", text, re.M | re.S).group(0) + "\n"
                        for name in ("decode", "split_mount", "mount_share", "mount_shares"))
    fake = tmp_path / "bb"
    fake.write_text(f'#!/bin/sh\n[ "$1" = mount ] && {{ echo "$*" >>{tmp_path}/calls; exit 32; }}\n'
                    f'exec {BUSYBOX} "$@"\n')
    fake.chmod(0o755)
    target = tmp_path / "guest" / "shared"
    words = [w.split("=", 1)[1] for w in InitArgs(mounts=[("virtiofs", "one", str(target), True),
                                                           ("9p", "two", str(target), False)]).words()]
    script = f"BB={fake}\n{functions}MOUNTS='{' '.join(words)} bogus'\nmount_shares; echo booted"
    out = subprocess.run([BUSYBOX, "sh", "-c", script], capture_output=True, text=True)
    assert out.stdout == "booted\n"
    assert out.stderr.splitlines() == [f"vmctl-init: cannot mount virtiofs one at {target}",
                                       f"vmctl-init: cannot mount 9p two at {target}",
                                       "vmctl-init: bad vmctl.mount=bogus"]
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"mount -t virtiofs -o ro one {target}",
        f"mount -t 9p -o rw,trans=virtio,version=9p2000.L,msize=524288 two {target}"]
    assert target.is_dir()


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
