"""The kernel command-line contract of vmctl's guest /init (see data/init, docs/images.md).

The VMM and tests build the `vmctl.*` words here and read the console markers back.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import shlex
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import VmctlError

READY_MARKER = "VMCTL-READY"
EXIT_PREFIX = "VMCTL-EXIT "
_EXIT_LINE = re.compile(r"^VMCTL-EXIT (\d+)\s*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")


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

    def words(self) -> list[str]:
        """Kernel command-line words, validated (a bad value would be silently ignored)."""
        out: list[str] = []
        if self.ip is not None:
            _check(lambda: ipaddress.IPv4Interface(self.ip), "vmctl.ip", self.ip)
            if "/" not in self.ip:
                raise VmctlError(f"vmctl.ip needs a prefix length: {self.ip!r} (e.g. /24)")
            out.append(f"vmctl.ip={self.ip}")
        for name, value in (("gw", self.gw), ("dns", self.dns)):
            if value is not None:
                _check(lambda: ipaddress.IPv4Address(value), f"vmctl.{name}", value)
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
            out.append(f"vmctl.cmd={encode(text)}")
        if self.read_only:
            out.append("ro")
        return out

    def cmdline(self) -> str:
        return " ".join(self.words())


def _check(parse: Callable[[], object], name: str, value: str) -> None:
    try:
        parse()
    except ValueError:
        raise VmctlError(f"{name}: not an IPv4 value: {value!r}") from None


def encode(text: str) -> str:
    """Base64 without newlines: survives the kernel's space-separated command line."""
    return base64.b64encode(text.encode()).decode("ascii")


def decode(word: str) -> str:
    return base64.b64decode(word.encode("ascii"), validate=True).decode()


def exit_code(line: str) -> int | None:
    """The command's exit code from a console line `VMCTL-EXIT <code>`, else None."""
    match = _EXIT_LINE.match(line.strip("\r\n"))
    return int(match.group(1)) if match else None
