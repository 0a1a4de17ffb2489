"""Host side of a VM's network, set up and torn down with `ip` (iproute2).

Each VM gets its own TAP with a point-to-point /30: the host address on the TAP, the guest
address next to it. Because the TAP is non-persistent, its address and routes vanish with
the VM process even on SIGKILL. Modes:

  isolated  the guest reaches the host's TAP address and nothing else (no forwarding)
  nat       as isolated, plus forwarding and an iptables MASQUERADE rule for the /30,
            tagged with the TAP's name; `sweep_stale_rules` removes the rules of TAPs that
            no longer exist (a VM that was killed), and runs before each setup.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import VmctlError
from .tap import Tap

log = logging.getLogger(__name__)

SUBNET_POOL = ipaddress.IPv4Network("172.30.0.0/16")
TAP_PREFIX = "vmctl"
RULE_TAG = "vmctl:"
TAP_ALIAS = "vmctl:"  # + the machine folder a persistent TAP belongs to (for vmctl prune)


def _ip(*args: str) -> str:
    if shutil.which("ip") is None:
        raise VmctlError("`ip` (iproute2) is needed for VM networking")
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode:
        raise VmctlError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def random_mac() -> str:
    """A locally administered unicast MAC (first byte x2/x6/xa/xe)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for link in json.loads(_ip("-j", "addr", "show") or "[]"):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                used.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    return used


def free_link_name(prefix: str) -> str:
    """The first `<prefix><n>` no network interface has (TAPs: vmctl0, veths: vmctlv0, ...)."""
    existing = set(os.listdir("/sys/class/net"))
    for index in range(1000):
        name = f"{prefix}{index}"
        if name not in existing:
            return name
    raise VmctlError(f"no free interface name {prefix}0..{prefix}999")


@contextlib.contextmanager
def allocation_lock() -> Iterator[None]:
    """Hold this (host-wide: interfaces and addresses are) from choosing a free link name
    and /30 until the address is on the link. Two machines started at once otherwise both
    see the same /30 free and the host routes one guest's address to the other's TAP."""
    folder = "/run/lock" if os.access("/run/lock", os.W_OK) else tempfile.gettempdir()
    with open(os.path.join(folder, "vmctl-net.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def free_subnet() -> ipaddress.IPv4Network:
    """A /30 of the pool that overlaps no address on this host (VMs and containers alike);
    call under allocation_lock() and put the address on a link before releasing it."""
    used = _used_networks()
    for candidate in SUBNET_POOL.subnets(new_prefix=30):
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise VmctlError(f"no free /30 left in {SUBNET_POOL}")


def enable_nat(subnet: ipaddress.IPv4Network, ifname: str) -> list[str]:
    """Forwarding on, and a MASQUERADE rule for `subnet` tagged with `ifname`; returns the rule."""
    if shutil.which("iptables") is None:
        raise VmctlError("network mode nat needs iptables (Debian: apt-get install iptables); isolated does not")
    with open("/proc/sys/net/ipv4/ip_forward", "w") as file:
        file.write("1")
    rule = ["POSTROUTING", "-t", "nat", "-s", str(subnet), "!", "-o", ifname, "-j", "MASQUERADE",
            "-m", "comment", "--comment", f"{RULE_TAG}{ifname}"]
    _iptables("-A", *rule)
    return rule


def disable_nat(rule: list[str]) -> None:
    try:
        _iptables("-D", *rule)
    except VmctlError as error:
        log.warning("network: %s", error)


class PointToPoint:
    """The two addresses of a /30: the host's end, then the guest's (VM or container)."""

    subnet: ipaddress.IPv4Network | None

    @property
    def host_ip(self) -> str:
        return str(self.subnet[1])

    @property
    def guest_ip(self) -> str:
        return str(self.subnet[2])


@dataclass
class HostNetwork(PointToPoint):
    """One VM's TAP and addresses; `close()` undoes everything `open()` did."""

    mode: str = "isolated"
    mac: str = field(default_factory=random_mac)
    tap: Tap | None = None
    subnet: ipaddress.IPv4Network | None = None
    _nat_rule: list[str] | None = None
    _guard: object | None = None  # the guard process holding the NAT rule (sandboxed VMMs)

    def kernel_ip_parameter(self) -> str:
        """`ip=` for the guest kernel's autoconfiguration (guest eth0, gateway = host)."""
        return f"ip={self.guest_ip}::{self.host_ip}:{self.subnet.netmask}::eth0:off"

    def open(self) -> "HostNetwork":
        if self.mode not in ("isolated", "nat"):
            raise VmctlError(f"network mode {self.mode!r}: use isolated or nat")
        sweep_stale_rules()
        try:
            with allocation_lock():
                self.tap = Tap(free_link_name(TAP_PREFIX))
                self.subnet = free_subnet()
                _quiet_ipv6(self.tap.name)
                _ip("addr", "add", f"{self.host_ip}/30", "dev", self.tap.name)
            _ip("link", "set", "dev", self.tap.name, "up")
            if self.mode == "nat":
                self._nat_rule = enable_nat(self.subnet, self.tap.name)
        except BaseException:
            self.close()
            raise
        log.info("network: %s %s, host %s, guest %s (%s)", self.mode, self.tap.name, self.host_ip, self.guest_ip, self.mac)
        return self

    def describe(self) -> dict:
        """network.json: what `vmctl ps`/`status`/`ssh` know of the machine's network."""
        return {"tap": self.tap.name, "host_ip": self.host_ip, "guest_ip": self.guest_ip, "mac": self.mac,
                "mode": self.mode, "subnet": str(self.subnet), "nat_rule": self._nat_rule}

    def detach(self) -> dict:
        """Hand the TAP to another process that opens it by name (QEMU under libvirt): it
        becomes persistent, our fd closes; `remove_detached(describe())` undoes it all."""
        self.tap.persist()
        info = self.describe()
        self.tap.close()
        self.tap, self._nat_rule = None, None
        return info

    def guard_nat_rule(self) -> str | None:
        """Hand the NAT rule to a privileged guard process (net/guard.py) that removes it when
        this process ends: for a VMM about to lose the right to run iptables. Returns what
        was done, for the sandbox's notes."""
        if not self._nat_rule:
            return None
        from . import guard

        process = guard.start(self._nat_rule)
        self._guard = process  # its stdin stays open as long as we run
        self._nat_rule = None
        return f"NAT rule removed at exit by guard process {process.pid}"

    def close(self) -> None:
        if self._nat_rule:
            disable_nat(self._nat_rule)
            self._nat_rule = None
        if self.tap:
            self.tap.close()  # the TAP, its address and route go with the fd
            self.tap = None


def remove_detached(info: dict) -> None:
    """Delete a detached network: its NAT rule and its persistent TAP (addresses go with it)."""
    if info.get("nat_rule"):
        disable_nat(info["nat_rule"])
    if os.path.exists(f"/sys/class/net/{info['tap']}"):
        try:
            _ip("link", "del", info["tap"])
        except VmctlError as error:
            log.warning("network: %s", error)


def _quiet_ipv6(name: str) -> None:
    """The link is IPv4 point-to-point: no IPv6 autoconfiguration chatter towards the guest."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as file:
            file.write("1")
    except OSError:
        pass


def _iptables(*args: str) -> str:
    result = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)
    if result.returncode:
        raise VmctlError(f"iptables {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def sweep_stale_rules() -> int:
    """Delete NAT rules tagged for TAPs that no longer exist; returns how many."""
    if shutil.which("iptables") is None:
        return 0
    try:
        listing = _iptables("-t", "nat", "-S", "POSTROUTING")
    except VmctlError:
        return 0
    existing = set(os.listdir("/sys/class/net"))
    removed = 0
    for line in listing.splitlines():
        if f'--comment {RULE_TAG}' not in line and f'--comment "{RULE_TAG}' not in line:
            continue
        tag = line.split("--comment", 1)[1].split()[0].strip('"')
        if tag[len(RULE_TAG):] in existing:
            continue
        words = line.replace('"', "").split()
        if words[:1] == ["-A"]:
            try:
                _iptables("-t", "nat", "-D", *words[1:])
                removed += 1
            except VmctlError as error:
                log.warning("network: %s", error)
    return removed
