"""TAP devices with virtio-net headers (IFF_VNET_HDR), opened through /dev/net/tun.

The TAP is not persistent: it exists while vmctl holds its fd, so it disappears with the
VM process however that process ends (exit, crash, SIGKILL).
"""

from __future__ import annotations

import fcntl
import os
import struct

from ..errors import VmctlError

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
IFNAMSIZ = 16
VNET_HDR_SIZE = 12  # struct virtio_net_hdr_v1 (VIRTIO 1.x always carries num_buffers)


class Tap:
    def __init__(self, name: str) -> None:
        if not 0 < len(name.encode()) < IFNAMSIZ:
            raise VmctlError(f"TAP name {name!r} must be 1..{IFNAMSIZ - 1} bytes")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise VmctlError(f"cannot open /dev/net/tun: {error.strerror}") from None
        try:
            request = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            answer = fcntl.ioctl(self.fd, TUNSETIFF, request)
            self.name = answer[:IFNAMSIZ].rstrip(b"\0").decode()
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except OSError as error:
            os.close(self.fd)
            raise VmctlError(f"cannot create TAP device {name}: {error.strerror} (needs CAP_NET_ADMIN)") from None

    def set_offload(self, flags: int) -> None:
        """Which offloaded packets the host may hand us (what the guest said it can take)."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def persist(self) -> None:
        """Keep the TAP after our fd closes, for a VMM that opens it by name (QEMU under
        libvirt); it is then removed with `ip link del`."""
        fcntl.ioctl(self.fd, TUNSETPERSIST, 1)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
