"""virtio-net (spec 5.1) over a TAP device with IFF_VNET_HDR.

Queue 0 receives (host → guest), queue 1 transmits. The 12-byte virtio_net_hdr_v1 passes
through the TAP unchanged, so checksum and segmentation offloads (CSUM, TSO4/6 both ways)
cost nothing here: the host kernel does the work the header asks for. TX is zero-copy
(`os.writev` of guest-memory views). RX reads straight into the guest's buffers when one
chain holds a packet; with MRG_RXBUF (small buffers, the Linux default) a packet is read
once into a host buffer and spread over as many chains as it needs.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Callable

from ..net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_SIZE, Tap
from .device import ID_NET, DeviceError, QueueContext, VirtioDevice
from .queue import DescriptorChain, Virtqueue

F_CSUM, F_GUEST_CSUM, F_MAC = 1 << 0, 1 << 1, 1 << 5
F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6 = 1 << 7, 1 << 8, 1 << 11, 1 << 12
F_MRG_RXBUF = 1 << 15

RX, TX = 0, 1
QUEUE_SIZE = 256
MAX_FRAME = 65550 + VNET_HDR_SIZE  # a 64 KiB GSO packet, its Ethernet header and the vnet header


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    return bytes(int(part, 16) for part in parts)


class NetDevice(VirtioDevice):
    device_id = ID_NET
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    name = "net"

    def __init__(self, tap: Tap, mac: str, on_close: Callable[[], None] | None = None) -> None:
        self.tap = tap
        self.mac = parse_mac(mac)
        self._on_close = on_close
        self._mrg_rxbuf = False
        self._ctx: QueueContext | None = None
        self._rx_queue: Virtqueue | None = None
        self._frame = bytearray(MAX_FRAME)
        self._pending = 0  # bytes of a frame read from the TAP that did not fit the guest's buffers yet

    @property
    def features(self) -> int:
        return (F_MAC | F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6
                | F_MRG_RXBUF)

    def config_bytes(self) -> bytes:
        return self.mac + struct.pack("<HHH", 0, 1, 0)  # status, max_virtqueue_pairs, mtu

    def activate(self, features: int, ctx: QueueContext) -> None:
        self._mrg_rxbuf = bool(features & F_MRG_RXBUF)
        self._ctx = ctx
        offload = 0
        if features & F_GUEST_CSUM:
            offload |= TUN_F_CSUM
            if features & F_GUEST_TSO4:
                offload |= TUN_F_TSO4
            if features & F_GUEST_TSO6:
                offload |= TUN_F_TSO6
        self.tap.set_offload(offload)

    def reset(self) -> None:
        self._pending = 0
        self._ctx = None
        self._rx_queue = None

    def extra_fds(self) -> dict[int, Callable[[], None]]:
        return {self.tap.fd: self._tap_readable}

    def process(self, index: int, queue: Virtqueue, ctx: QueueContext) -> None:
        if index == TX:
            self._transmit(queue, ctx)
        else:
            self._rx_queue = queue
            self._receive(queue, ctx)

    # --- guest → host ----------------------------------------------------------------------
    def _transmit(self, queue: Virtqueue, ctx: QueueContext) -> None:
        for chain in queue.drain():
            if chain.readable_length < VNET_HDR_SIZE:
                raise DeviceError(f"TX chain of {chain.readable_length} bytes has no virtio-net header")
            if chain.readable_length > MAX_FRAME:
                raise DeviceError(f"TX frame of {chain.readable_length} bytes exceeds {MAX_FRAME}")
            try:
                os.writev(self.tap.fd, chain.readable_views(ctx.memory))
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EIO, errno.EINVAL, errno.ENOBUFS):
                    raise
                # The host dropped the frame (queue full, link down, bad offload header): like a wire.
            ctx.complete(queue, chain, 0)

    # --- host → guest ----------------------------------------------------------------------
    def _tap_readable(self) -> None:
        if self._rx_queue is not None and self._ctx is not None:
            self._receive(self._rx_queue, self._ctx)

    def _receive(self, queue: Virtqueue, ctx: QueueContext) -> None:
        while True:
            if not self._pending:
                if queue.pending() == 0:
                    queue.set_notification(True)
                    if queue.pending() == 0:
                        return  # no buffers: the next RX kick resumes here
                try:
                    self._pending = os.readv(self.tap.fd, [self._frame])
                except BlockingIOError:
                    return  # TAP drained; the next edge on its fd resumes here
            if not self._deliver(queue, ctx):
                # Not enough buffers for this frame: ask for a kick on the next one the
                # driver posts (avail_event would otherwise stay where the last drain left
                # it, behind buffers already posted, and no kick would ever come).
                seen = queue.kick_on_next()
                if queue.avail_idx() == seen:
                    return  # the RX kick resumes here

    def _deliver(self, queue: Virtqueue, ctx: QueueContext) -> bool:
        """Copy the pending frame into one chain (or several with MRG_RXBUF); False when the
        guest has not posted enough buffers yet (the frame stays pending)."""
        length = self._pending
        frame = memoryview(self._frame)[:length]
        if not self._mrg_rxbuf:
            chain = queue.pop()
            if chain is None:
                return False
            struct.pack_into("<H", self._frame, 10, 1)  # num_buffers (the TAP leaves it untouched)
            written = chain.write_writable(ctx.memory, frame)  # a short buffer truncates, like a NIC
            self._pending = 0
            ctx.complete(queue, chain, written)
            return True
        chains: list[tuple[DescriptorChain, int]] = []
        offset = 0
        while offset < length:
            chain = queue.pop()
            if chain is None:
                queue.last_avail = (queue.last_avail - len(chains)) & 0xFFFF  # give them back, retry later
                return False
            if chain.writable_length == 0 or (not chains and chain.writable_length < VNET_HDR_SIZE):
                raise DeviceError("RX buffer too small for the virtio-net header")
            count = min(chain.writable_length, length - offset)
            chains.append((chain, count))
            offset += count
        struct.pack_into("<H", self._frame, 10, len(chains))  # num_buffers
        offset = 0
        for chain, count in chains:
            chain.write_writable(ctx.memory, frame[offset : offset + count])
            offset += count
        ctx.complete_many(queue, [(chain.head, count) for chain, count in chains])
        self._pending = 0
        return True

    def close(self) -> None:
        self.tap.close()
        if self._on_close:
            self._on_close()
            self._on_close = None

