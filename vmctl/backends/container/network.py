"""A container's network: a veth pair, the container's counterpart of a VM's TAP.

vmctl has no host bridge: each VM gets a TAP with its own point-to-point /30 (vmctl/net/host.py).
A container gets the same: the host end of a veth pair carries the /30's host address, the
other end is created directly inside the container's network namespace as eth0 with the
guest address and a default route via the host. Addresses come from the same pool, and nat
uses the same MASQUERADE rule tagged with the host interface's name, so VMs and containers
reach each other through the host's routing and are measured the same way.

The peer lives in the container's namespace: when the container's last process exits, the
namespace, the pair and its addresses go with it (even after kill -9); a leftover NAT rule is
removed by `sweep_stale_rules` as for a dead VM's TAP. `none`: the namespace stays empty
(loopback only).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

from ...errors import VmctlError

# The VM network's helpers: one address pool, one rule format, one sweeper for both.
from ...net.host import (
    PointToPoint,
    _ip,
    _quiet_ipv6,
    allocation_lock,
    disable_nat,
    enable_nat,
    free_link_name,
    free_subnet,
    sweep_stale_rules,
)

log = logging.getLogger(__name__)

VETH_PREFIX = "vmctlv"
GUEST_IFNAME = "eth0"


def _in_netns(pid: int, *args: str) -> None:
    """`ip ARGS` (the host's binary) inside the network namespace of process `pid`."""
    if shutil.which("nsenter") is None:
        raise VmctlError("`nsenter` (util-linux) is needed for container networking")
    result = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", *args], capture_output=True, text=True)
    if result.returncode:
        raise VmctlError(f"ip {' '.join(args)} (in the container): {result.stderr.strip()}")


@dataclass
class ContainerNetwork(PointToPoint):
    mode: str  # isolated | nat
    host_ifname: str | None = None
    subnet: ipaddress.IPv4Network | None = None
    _nat_rule: list[str] | None = None

    def open(self, pid: int) -> "ContainerNetwork":
        """Wire the network namespace of `pid` (the created, not yet started, container)."""
        if self.mode not in ("isolated", "nat"):
            raise VmctlError(f"network mode {self.mode!r}: use isolated or nat")
        sweep_stale_rules()
        try:
            with allocation_lock():
                self.subnet = free_subnet()
                name = free_link_name(VETH_PREFIX)
                _ip("link", "add", name, "type", "veth", "peer", "name", GUEST_IFNAME, "netns", str(pid))
                self.host_ifname = name
                _quiet_ipv6(name)
                _ip("addr", "add", f"{self.host_ip}/30", "dev", name)
            _ip("link", "set", "dev", name, "up")
            _in_netns(pid, "addr", "add", f"{self.guest_ip}/30", "dev", GUEST_IFNAME)
            _in_netns(pid, "link", "set", "dev", GUEST_IFNAME, "up")
            _in_netns(pid, "route", "add", "default", "via", self.host_ip)
            if self.mode == "nat":
                self._nat_rule = enable_nat(self.subnet, name)
        except BaseException:
            self.close()
            raise
        log.info("network: %s %s, host %s, container %s", self.mode, self.host_ifname, self.host_ip, self.guest_ip)
        return self

    def describe(self) -> dict:
        """network.json: the fields `vmctl ps --json`/`status` show for VMs too."""
        return {"mode": self.mode, "tap": self.host_ifname, "veth": self.host_ifname,
                "host_ip": self.host_ip, "guest_ip": self.guest_ip, "subnet": str(self.subnet)}

    def close(self) -> None:
        if self._nat_rule:
            disable_nat(self._nat_rule)
            self._nat_rule = None
        if self.host_ifname and os.path.exists(f"/sys/class/net/{self.host_ifname}"):
            try:
                _ip("link", "del", self.host_ifname)  # the peer goes with it
            except VmctlError as error:
                log.warning("network: %s", error)
        self.host_ifname = None
