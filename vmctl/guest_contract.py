"""The contract between vmctl and the guests it boots, in one place.

Every backend, the VMM, the CLI and the tests build the guest side from here and read it
back with these functions, so a marker or an argument is never spelled twice:

- the kernel command line vmctl's /init reads (`vmctl.*` words, `InitArgs`; see
  images/data/init and docs/images.md) and the words every backend adds to it;
- the console markers /init prints (`VMCTL-READY`, `VMCTL-EXIT <code>`);
- the guest agent (a shell loop on a virtio-console port or ttyS1, the host side is `vmctl.vmm.agent`) and the
  scripts /init and `exec` run;
- the reference images a machine without its own kernel boots;
- `ExecResult`, what running a command in any guest returns.
"""

from __future__ import annotations

import base64
import gzip
import ipaddress
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import VmctlError

# --- console markers ----------------------------------------------------------------------
READY_MARKER = "VMCTL-READY"  # /init: mounts, network and sshd are up
READY_MARKER_BYTES = READY_MARKER.encode()
EXIT_PREFIX = "VMCTL-EXIT "  # /init: the command ended with this status, a reset follows
EXIT_LINE = re.compile(r"^VMCTL-EXIT (\d+)\s*$")
# vmctl cp's transfer share: every native VM mounts its machine folder's `xfer/` here
XFER_DIR = "xfer"
XFER_GUEST = "/run/vmctl/xfer"
XFER_TAG = "vmctl-xfer"
_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,36}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")


def exit_code(line: str) -> int | None:
    """The command's exit code from a console line `VMCTL-EXIT <code>`, else None."""
    match = EXIT_LINE.match(line.strip("\r\n"))
    return int(match.group(1)) if match else None


def exit_code_in(console: bytes) -> int | None:
    """The status /init printed in a whole console log (VMCTL-EXIT n), the last one wins."""
    code = None
    for line in console.splitlines():
        found = exit_code(line.decode(errors="replace"))
        if found is not None:
            code = found
    return code


# --- kernel command line ------------------------------------------------------------------
# `quiet`: every console byte is a VM exit into Python (a few thousand for a full boot log,
# which costs seconds under nested virtualization); warnings, errors and panics still show.
# Drop it, or add `loglevel=7 earlyprintk=serial,ttyS0`, to watch the whole boot.
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=1 quiet i8042.noaux i8042.nomux i8042.dumbkbd"
ROOT_CMDLINE = "root=/dev/vda rw"  # a profile that boots from its root disk (debian)
# The reference kernel registers one legacy UART unless told more (SERIAL_8250_RUNTIME_UARTS=1);
# the agent needs ttyS1 (COM2).
AGENT_CMDLINE = "8250.nr_uarts=2"


@dataclass(frozen=True)
class InitArgs:
    """What /init should do. `cmd` is a shell string or an argv list (quoted for sh)."""

    ip: str | None = None  # "10.0.2.15/24"
    gw: str | None = None
    dns: str | None = None
    iface: str | None = None  # default eth0
    hostname: str | None = None  # default vmctl
    sshkey: str | None = None  # one authorized_keys line
    cmd: str | Sequence[str] | None = None
    read_only: bool = False
    # shared folders: (type "virtiofs" or "9p", tag, absolute guest path, read-only)
    mounts: Sequence[tuple[str, str, str, bool]] = ()
    # virtio-pmem bases: the guest path where /dev/pmem<i> is mounted read-only with DAX
    pmem: Sequence[str] = ()

    def words(self) -> list[str]:
        """Kernel command-line words, validated (a bad value would be silently ignored)."""
        out: list[str] = []
        if self.ip is not None:
            ip = self.ip
            _check(ipaddress.IPv4Interface, "vmctl.ip", ip)
            if "/" not in ip:
                raise VmctlError(f"vmctl.ip needs a prefix length: {ip!r} (e.g. /24)")
            out.append(f"vmctl.ip={ip}")
        for name, value in (("gw", self.gw), ("dns", self.dns)):
            if value is not None:
                _check(ipaddress.IPv4Address, f"vmctl.{name}", value)
                out.append(f"vmctl.{name}={value}")
        for name, value in (("iface", self.iface), ("hostname", self.hostname)):
            if value is not None:
                if not _NAME.match(value):
                    raise VmctlError(f"vmctl.{name}: invalid name {value!r}")
                out.append(f"vmctl.{name}={value}")
        if self.sshkey is not None:
            out.append(f"vmctl.sshkey={encode(self.sshkey.strip())}")
        if self.cmd is not None:
            text = self.cmd if isinstance(self.cmd, str) else shlex.join(self.cmd)
            out.append(f"vmctl.cmd={encode_script(text)}")
        for kind, tag, path, read_only in self.mounts:
            if kind not in ("virtiofs", "9p") or not _TAG.match(tag) or not path.startswith("/"):
                raise VmctlError(f"vmctl.mount: bad mount {kind} {tag!r} at {path!r}")
            out.append(f"vmctl.mount={kind},{tag},{encode(path)},{'ro' if read_only else 'rw'}")
        for index, path in enumerate(self.pmem):
            if not path.startswith("/"):
                raise VmctlError(f"vmctl.pmem: {path!r} is not an absolute path")
            out.append(f"vmctl.pmem={index},{encode(path)}")
        if self.read_only:
            out.append("ro")
        return out

    def cmdline(self) -> str:
        return " ".join(self.words())


def _check(parse: Callable[[str], object], name: str, value: str) -> None:
    try:
        parse(value)
    except ValueError:
        raise VmctlError(f"{name}: not an IPv4 value: {value!r}") from None


def encode(text: str) -> str:
    """Base64 without newlines: survives the kernel's space-separated command line."""
    return base64.b64encode(text.encode()).decode("ascii")


def encode_script(script: str) -> str:
    """`encode(script)`, or, when shorter, a one-line stub that gunzips the script and evals it
    in the same shell (same stdin, same exit status): the command line holds 2047 bytes and a
    set-up script with an ssh user and environment outgrows it as plain base64."""
    plain = encode(script)
    packed = base64.b64encode(gzip.compress(script.encode(), mtime=0)).decode("ascii")
    stub = encode(f'eval "$(echo {packed}|/bin/busybox base64 -d|/bin/busybox gunzip)"')
    return stub if len(stub) < len(plain) else plain


def decode(word: str) -> str:
    return base64.b64decode(word.encode("ascii"), validate=True).decode()


def decode_script(word: str) -> str:
    """The script `encode_script` encoded, whichever form it took."""
    text = decode(word)
    stub = re.fullmatch(r'eval "\$\(echo (\S+)\|/bin/busybox base64 -d\|/bin/busybox gunzip\)"', text)
    return gzip.decompress(base64.b64decode(stub.group(1))).decode() if stub else text


# --- scripts the guest runs ---------------------------------------------------------------
# The guest agent. Runs under busybox sh or dash. Its port is the device the kernel command
# line names with `vmctl.agent=` (the virtio-console port of the native VMM or of a libvirt
# domain, hvcN: a page per VM exit) when that device node exists, else ttyS1 (COM2: a VM exit
# per byte; a kernel without virtio-console, or VMCTL_AGENT_CONSOLE=0). The port is put in raw mode without echo so a line of any
# length arrives whole; each script runs with stdin from /dev/null, one at a time, its output
# kept in /tmp (a tmpfs under vmctl's /init) and streamed back by base64 itself (no shell
# variable holds it). Every process spawned costs the guest milliseconds under nested
# virtualization: one set of files is reused (requests run one at a time) and emptied with
# shell builtins, and an empty output is not piped through base64. The protocol (one line per message, base64 so any bytes survive):
#     host  -> guest   X <id> <base64 shell script>
#     guest -> host    R <id> <exit code> <base64 stdout> <base64 stderr>
#     guest -> host    A ready                (once, when the agent starts)
AGENT_PORT_WORD = "vmctl.agent"
GUEST_AGENT = r"""(B=/bin/busybox;p=/dev/ttyS1;t=/tmp/.vmctl-agent;set -f
for w in $($B cat /proc/cmdline);do case $w in vmctl.agent=*)[ -c /dev/${w#*=} ]&&p=/dev/${w#*=};;esac;done
$B stty -F $p raw -echo 2>/dev/null||{ p=/dev/ttyS1;$B stty -F $p raw -echo 2>/dev/null;}||exit 0
exec <$p >$p 2>/dev/null
echo 'A ready'
while read -r k i d;do
[ "$k" = X ]||continue
echo "$d"|$B base64 -d >$t.sh
/bin/sh $t.sh </dev/null >$t.o 2>$t.e
printf 'R %s %s ' $i $?;[ -s $t.o ]&&$B base64 -w0 <$t.o;printf ' ';[ -s $t.e ]&&$B base64 -w0 <$t.e;echo
:>$t.sh;:>$t.o;:>$t.e
done)&"""
LOGIN_SHELL = "exec /bin/busybox setsid /bin/busybox cttyhack /bin/sh -l"
# What `vmctl down` asks the agent to run: sync, then the i8042 reset `reboot=k` gives.
SHUTDOWN_SCRIPT = "sync; /bin/busybox reboot -f"


# Console markers of the set-up the command script does before the command (the ssh user):
# `up` waits for SETUP_DONE instead of VMCTL-READY when there is set-up to wait for, and a
# SETUP_FAILED line fails the boot with its message (the script then exits 1).
SETUP_DONE = "VMCTL-SETUP-DONE"
SETUP_FAILED = "VMCTL-SETUP-FAILED"


def has_setup(user: str) -> bool:
    """Whether the command script sets something up (and prints SETUP_DONE or SETUP_FAILED)."""
    return user != "root"


def user_setup(user: str) -> str:
    """Shell lines that create `user` with the image's own tool (useradd on debian; on an
    image without one, such as busybox-static's, which has no adduser applet, by appending
    to /etc/passwd, /etc/group and /etc/shadow) and give it root's authorized keys. Any
    failure prints SETUP_FAILED with the tool's message and ends the script with status 1.
    Terse on purpose: it travels base64-encoded on a kernel command line of 2047 bytes."""
    return "\n".join([
        f'B=/bin/busybox;u={user};h=/home/$u;f(){{ echo "{SETUP_FAILED} $*";exit 1;}}',
        'if $B grep -q "^$u:" /etc/passwd;then :',
        # "*" (not "!", which useradd leaves) unlocks the account for key logins only.
        "elif command -v useradd >/dev/null;then o=$(useradd -m -s /bin/bash $u 2>&1&&usermod -p '*' $u 2>&1)"
        '||f "useradd $u: $o"',
        'else i=1000;while $B grep -q "^[^:]*:[^:]*:$i:" /etc/passwd /etc/group;do i=$((i+1));done',
        'o=$({ echo "$u:x:$i:$i::$h:/bin/sh">>/etc/passwd&&echo "$u:x:$i:">>/etc/group&&'
        '{ [ ! -e /etc/shadow ]||echo "$u:*:1:0:99999:7:::">>/etc/shadow;};} 2>&1)||f "cannot add $u: $o"',
        "fi",
        # Numeric ids: a static busybox may not resolve names through the image's NSS.
        'o=$($B mkdir -p $h/.ssh 2>&1&&{ [ ! -e /root/.ssh/authorized_keys ]||$B cp /root/.ssh/authorized_keys $h/.ssh 2>&1;}'
        "&&$B chown -R $($B awk -F: -v u=$u '$1==u{print $3\":\"$4}' /etc/passwd) $h 2>&1)||f \"home of $u: $o\"",
        f"echo {SETUP_DONE}",
    ])


def boot_script(command: Sequence[str], environment: Mapping[str, str], user: str) -> str:
    """The `vmctl.cmd` script /init runs: the exec agent in the background, the ssh user,
    then the machine's command (its status becomes VMCTL-EXIT) or a login shell."""
    lines = [GUEST_AGENT]
    if has_setup(user):
        lines.append(user_setup(user))
    lines += [f"export {name}={shlex.quote(value)}" for name, value in environment.items()]
    # Like `docker run` without -i: the command reads EOF, never the console (which would
    # wait for keystrokes that no one types).
    lines.append(f"{shlex.join(command)} </dev/null" if command else LOGIN_SHELL)
    return "\n".join(lines)


def exec_script(command: Sequence[str], environment: Mapping[str, str]) -> str:
    """The shell line `vmctl exec` runs in a guest: the machine's environment, then the command."""
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in environment.items())
    return exports + shlex.join(command)


@dataclass(frozen=True)
class ExecResult:
    """A command run in a guest (over SSH, the agent, or the container runtime)."""

    exit_code: int
    stdout: bytes
    stderr: bytes


# --- reference images ---------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceImages:
    """What a machine without its own kernel boots: busybox from its initramfs, debian from
    its qcow2 root disk (then `ROOT_CMDLINE` goes on the command line)."""

    kernel: Path
    initrd: Path | None
    root_disk: Path | None


def reference_images(profile: str) -> ReferenceImages:
    """The built reference images of an image profile. Errors say how to build what is missing."""
    from .images.layout import locate

    found = locate(profile)
    if not found.bzimage.exists():
        raise VmctlError(f"the reference kernel is not built ({found.bzimage}): run `vmctl image build`")
    if profile == "busybox":
        if not found.initramfs.exists():
            raise VmctlError(f"the busybox initramfs is not built ({found.initramfs}): run `vmctl image build`")
        return ReferenceImages(found.bzimage, found.initramfs, None)
    if not found.rootfs_qcow2.exists():
        raise VmctlError(f"the {profile} root disk is not built ({found.rootfs_qcow2}): "
                         f"run `vmctl image rootfs --profile {profile}`")
    return ReferenceImages(found.bzimage, None, found.rootfs_qcow2)
