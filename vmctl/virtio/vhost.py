"""vhost-net: the kernel serves a virtio-net device's queues, so packets never enter Python.

The device model stays ours (features, config space, the virtio-mmio registers); at
DRIVER_OK the negotiated rings are handed to /dev/vhost-net together with the TAP: guest
kicks reach the kernel's vhost worker through the queues' ioeventfds, and its completions
raise the guest's interrupt through the slot's irqfd. Nothing of the data path is left in
the VMM process. vhost only touches guest memory through the table given here (guest RAM),
so a hostile driver reaches no other host memory.

ABI: <linux/vhost.h> and <linux/vhost_types.h>; the ioctl numbers are checked against the
headers in tests/unit/test_vhost_abi.py.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct

from ..memory import GuestMemory
from .device import QueueHandoff

log = logging.getLogger(__name__)

DEVICE = "/dev/vhost-net"


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAF << 8) | number


_IO, _IOW, _IOR = 0, 1, 2
VHOST_GET_FEATURES = _ioc(_IOR, 0x00, 8)
VHOST_SET_FEATURES = _ioc(_IOW, 0x00, 8)
VHOST_SET_OWNER = _ioc(_IO, 0x01, 0)
VHOST_SET_MEM_TABLE = _ioc(_IOW, 0x03, 8)  # struct vhost_memory: its header; regions follow
VHOST_SET_VRING_NUM = _ioc(_IOW, 0x10, 8)
VHOST_SET_VRING_ADDR = _ioc(_IOW, 0x11, 40)
VHOST_SET_VRING_BASE = _ioc(_IOW, 0x12, 8)
VHOST_GET_VRING_BASE = _ioc(_IOR | _IOW, 0x12, 8)
VHOST_SET_VRING_KICK = _ioc(_IOW, 0x20, 8)
VHOST_SET_VRING_CALL = _ioc(_IOW, 0x21, 8)
VHOST_NET_SET_BACKEND = _ioc(_IOW, 0x30, 8)

_VRING_STATE = struct.Struct("<II")  # index, num
_VRING_FILE = struct.Struct("<Ii")  # index, fd
_VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (user addresses)
_MEMORY_HEADER = struct.Struct("<II")  # nregions, padding
_MEMORY_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, flags_padding


class VhostError(Exception):
    """vhost could not take the queues; the device falls back to serving them in Python."""


def available() -> bool:
    """Can this process open /dev/vhost-net (module loaded, root or the device's group)?"""
    return os.access(DEVICE, os.R_OK | os.W_OK)


class VhostNet:
    """An owned /dev/vhost-net instance serving a TAP; closing it gives the queues back."""

    def __init__(self) -> None:
        try:
            self.fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise VhostError(f"cannot open {DEVICE}: {error.strerror}") from None
        try:
            fcntl.ioctl(self.fd, VHOST_SET_OWNER)
            self.features = struct.unpack("<Q", fcntl.ioctl(self.fd, VHOST_GET_FEATURES, bytes(8)))[0]
        except OSError as error:
            self.close()
            raise VhostError(f"vhost-net: {error.strerror}") from None

    def start(self, features: int, memory: GuestMemory, queues: list[QueueHandoff], tap_fd: int) -> None:
        """Give the kernel the negotiated features, guest RAM, every ring and the TAP."""
        if features & ~self.features:
            raise VhostError(f"vhost-net lacks negotiated features 0x{features & ~self.features:x}")
        try:
            fcntl.ioctl(self.fd, VHOST_SET_FEATURES, struct.pack("<Q", features))
            table = _MEMORY_HEADER.pack(len(memory.regions), 0) + b"".join(
                _MEMORY_REGION.pack(r.guest_address, r.size, r.host_address, 0) for r in memory.regions)
            fcntl.ioctl(self.fd, VHOST_SET_MEM_TABLE, table)
            for index, handoff in enumerate(queues):
                queue = handoff.queue
                fcntl.ioctl(self.fd, VHOST_SET_VRING_NUM, _VRING_STATE.pack(index, queue.size))
                fcntl.ioctl(self.fd, VHOST_SET_VRING_BASE, _VRING_STATE.pack(index, queue.last_avail))
                fcntl.ioctl(self.fd, VHOST_SET_VRING_ADDR, _VRING_ADDR.pack(
                    index, 0, memory.host_address(queue.desc_table), memory.host_address(queue.used_ring),
                    memory.host_address(queue.avail_ring), 0))
                fcntl.ioctl(self.fd, VHOST_SET_VRING_KICK, _VRING_FILE.pack(index, handoff.kick_fd))
                fcntl.ioctl(self.fd, VHOST_SET_VRING_CALL, _VRING_FILE.pack(index, handoff.call_fd))
            for index in range(len(queues)):
                fcntl.ioctl(self.fd, VHOST_NET_SET_BACKEND, _VRING_FILE.pack(index, tap_fd))
        except OSError as error:
            raise VhostError(f"vhost-net setup: {error.strerror}") from None

    def stop_rings(self, count: int) -> list[int]:
        """Detach the TAP from every ring (the kernel stops touching guest memory), then read
        where the kernel stopped taking buffers: each ring's last_avail_idx."""
        try:
            for index in range(count):
                fcntl.ioctl(self.fd, VHOST_NET_SET_BACKEND, _VRING_FILE.pack(index, -1))
            return [_VRING_STATE.unpack(fcntl.ioctl(self.fd, VHOST_GET_VRING_BASE, _VRING_STATE.pack(index, 0)))[1]
                    for index in range(count)]
        except OSError as error:
            raise VhostError(f"vhost-net stop: {error.strerror}") from None

    def close(self) -> None:
        """Stops the kernel's worker for this device (it lets go of the TAP and the rings)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
