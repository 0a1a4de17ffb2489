"""virtio-net (spec 5.1) over a TAP device with IFF_VNET_HDR.

Queue 0 receives (host → guest), queue 1 transmits. The 12-byte virtio_net_hdr_v1 passes
through the TAP unchanged, so checksum and segmentation offloads (CSUM, TSO4/6 both ways)
cost nothing here: the host kernel does the work the header asks for. TX is zero-copy
(`os.writev` of guest-memory views). RX with MRG_RXBUF (small buffers, the Linux default)
is zero-copy too: the device holds enough of the guest's buffers for the largest frame and
`readv`s each frame straight into them, then completes as many as the frame filled. When
the guest has posted less than that, a frame is read into a host buffer and spread over
the chains it needs once they are there (also the path without MRG_RXBUF).

Where /dev/vhost-net is usable, none of that runs: at DRIVER_OK both queues and the TAP go to
the kernel's vhost-net worker (`vhost.py`), and this class only answers the registers.
`VMCTL_VHOST=0` keeps the Python data path (to compare, or to debug it).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from typing import TYPE_CHECKING, Callable

from ..memory import GuestMemory
from ..net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_SIZE, Tap
from .device import ID_NET, TRANSPORT_FEATURES, DeviceError, QueueContext, QueueHandoff, VirtioDevice
from .queue import DescriptorChain, Virtqueue

if TYPE_CHECKING:
    from . import vhost

log = logging.getLogger(__name__)

F_CSUM, F_GUEST_CSUM, F_MAC = 1 << 0, 1 << 1, 1 << 5
F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6 = 1 << 7, 1 << 8, 1 << 11, 1 << 12
F_MRG_RXBUF = 1 << 15

RX, TX = 0, 1
QUEUE_SIZE = 256
MAX_FRAME = 65550 + VNET_HDR_SIZE  # a 64 KiB GSO packet, its Ethernet header and the vnet header
NUM_BUFFERS_OFFSET = 10  # virtio_net_hdr_v1.num_buffers


def _put(views: list[memoryview], offset: int, data: bytes | memoryview) -> None:
    """Write `data` at byte `offset` of the concatenation of `views` (it fits: callers check)."""
    for view in views:
        size = view.nbytes
        if offset >= size:
            offset -= size
            continue
        count = min(size - offset, len(data))
        view[offset : offset + count] = data[:count]
        data = data[count:]
        offset = 0
        if not data:
            return


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
        # MRG_RXBUF chains taken from the ring but not filled yet, with their views and sizes.
        self._held: list[tuple[DescriptorChain, list[memoryview], int]] = []
        self._held_bytes = 0
        self._vhost: vhost.VhostNet | None = None  # while the kernel serves the queues
        self._vhost_problem_logged = False
        self._vhost_spare: vhost.VhostNet | None = None  # opened before a sandbox dropped root

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

    def offload(self, features: int, memory: GuestMemory, queues: list[QueueHandoff]) -> bool:
        from . import vhost

        if os.environ.get("VMCTL_VHOST") == "0" or (self._vhost_spare is None and not vhost.available()):
            return False
        # vhost sees the ring and header features only; offloads are the TAP's business.
        wanted = features & (TRANSPORT_FEATURES | F_MRG_RXBUF)
        try:
            kernel, self._vhost_spare = self._vhost_spare or vhost.VhostNet(), None
            try:
                kernel.start(wanted, memory, queues, self.tap.fd)
            except vhost.VhostError:
                kernel.close()
                raise
        except vhost.VhostError as error:
            if not self._vhost_problem_logged:
                log.warning("virtio-net: %s; serving the queues in Python", error)
                self._vhost_problem_logged = True
            return False
        self._vhost = kernel
        if self.unwatch:
            self.unwatch(self.tap.fd)  # the kernel reads the TAP now
        log.info("virtio-net: vhost-net serves the queues (features 0x%x)", wanted)
        return True

    def before_sandbox(self) -> list[str]:
        """Open /dev/vhost-net now: the sandbox's user may not (a device reset after that
        needs a fresh one and falls back to the Python data path)."""
        from . import vhost

        if os.environ.get("VMCTL_VHOST") == "0" or not vhost.available() or self._vhost_spare:
            return []
        try:
            self._vhost_spare = vhost.VhostNet()
        except vhost.VhostError as error:
            return [f"vhost-net: {error}"]
        return ["/dev/vhost-net opened before the drop"]

    def _stop_vhost(self) -> None:
        if self._vhost is not None:
            self._vhost.close()
            self._vhost = None
            if self.watch and self.tap.fd >= 0:
                self.watch(self.tap.fd, self._tap_readable)

    def unconsumed(self, index: int) -> int:
        return len(self._held) if index == RX else 0

    def reclaim(self, queues: list[Virtqueue]) -> None:
        if self._vhost is not None:
            for queue, last_avail in zip(queues, self._vhost.stop_rings(len(queues))):
                queue.sync_from_ring(last_avail)
            self._stop_vhost()

    def reset(self) -> None:
        self._stop_vhost()
        self._pending = 0
        self._held, self._held_bytes = [], 0
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
        """Every frame the guest queued, then one used-ring update for all of them."""
        sent: list[tuple[int, int]] = []
        fd, memory = self.tap.fd, ctx.memory
        for chain in queue.drain():
            length = chain.readable_length
            if length < VNET_HDR_SIZE:
                raise DeviceError(f"TX chain of {length} bytes has no virtio-net header")
            if length > MAX_FRAME:
                raise DeviceError(f"TX frame of {length} bytes exceeds {MAX_FRAME}")
            try:
                os.writev(fd, chain.readable_views(memory))
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EIO, errno.EINVAL, errno.ENOBUFS):
                    raise
                # The host dropped the frame (queue full, link down, bad offload header): like a wire.
            sent.append((chain.head, 0))
        if sent:
            if ctx.complete_many is not None:
                ctx.complete_many(queue, sent)
            else:
                for head, _ in sent:
                    ctx.complete(queue, DescriptorChain(head), 0)

    # --- host → guest ----------------------------------------------------------------------
    def _tap_readable(self) -> None:
        if self._rx_queue is not None and self._ctx is not None:
            self._receive(self._rx_queue, self._ctx)

    def _receive(self, queue: Virtqueue, ctx: QueueContext) -> None:
        while True:
            if not self._pending:
                if self._mrg_rxbuf and self._hold_for_a_frame(queue, ctx):
                    try:
                        length = os.readv(self.tap.fd, [view for _, views, _ in self._held for view in views])
                    except BlockingIOError:
                        return  # TAP drained; the next edge on its fd resumes here
                    self._complete_held(queue, ctx, length)
                    continue
                if not self._held and queue.pending() == 0:
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

    def _take(self, queue: Virtqueue, ctx: QueueContext) -> tuple[DescriptorChain, list[memoryview], int] | None:
        """The next RX chain: one already held, else the ring's next (checked)."""
        if self._held:
            entry = self._held.pop(0)
            self._held_bytes -= entry[2]
            return entry
        chain = queue.pop()
        if chain is None:
            return None
        size = chain.writable_length
        if size == 0:
            raise DeviceError("RX buffer has no device-writable part")
        return chain, chain.writable_views(ctx.memory), size

    def _hold_for_a_frame(self, queue: Virtqueue, ctx: QueueContext) -> bool:
        """Take chains from the ring until the held ones fit the largest frame."""
        while self._held_bytes < MAX_FRAME:
            chain = queue.pop()
            if chain is None:
                return False
            size = chain.writable_length
            if size == 0 or (not self._held and size < VNET_HDR_SIZE):
                raise DeviceError("RX buffer too small for the virtio-net header")
            self._held.append((chain, chain.writable_views(ctx.memory), size))
            self._held_bytes += size
        return True

    def _complete_held(self, queue: Virtqueue, ctx: QueueContext, length: int) -> None:
        """A frame of `length` bytes was read across the held chains: complete those it filled."""
        if length <= 0:
            return
        header_views = self._held[0][1]
        used: list[tuple[int, int]] = []
        left = length
        while left > 0:
            chain, _, size = self._held.pop(0)
            self._held_bytes -= size
            used.append((chain.head, min(size, left)))
            left -= size
        _put(header_views, NUM_BUFFERS_OFFSET, struct.pack("<H", len(used)))  # the TAP leaves it alone
        assert ctx.complete_many is not None  # the mmio transport always batches
        ctx.complete_many(queue, used)

    def _deliver(self, queue: Virtqueue, ctx: QueueContext) -> bool:
        """Copy the pending frame into one chain (or several with MRG_RXBUF); False when the
        guest has not posted enough buffers yet (the frame stays pending)."""
        length = self._pending
        frame = memoryview(self._frame)[:length]
        if not self._mrg_rxbuf:
            chain = queue.pop()
            if chain is None:
                return False
            struct.pack_into("<H", self._frame, NUM_BUFFERS_OFFSET, 1)
            written = chain.write_writable(ctx.memory, frame)  # a short buffer truncates, like a NIC
            self._pending = 0
            ctx.complete(queue, chain, written)
            return True
        taken: list[tuple[DescriptorChain, list[memoryview], int]] = []
        capacity = 0
        while capacity < length:
            entry = self._take(queue, ctx)
            if entry is None:
                self._held[:0] = taken  # keep them for when the rest arrives
                self._held_bytes += capacity
                return False
            if not taken and entry[2] < VNET_HDR_SIZE:
                raise DeviceError("RX buffer too small for the virtio-net header")
            taken.append(entry)
            capacity += entry[2]
        struct.pack_into("<H", self._frame, NUM_BUFFERS_OFFSET, len(taken))
        used: list[tuple[int, int]] = []
        offset = 0
        for chain, views, size in taken:
            count = min(size, length - offset)
            _put(views, 0, frame[offset : offset + count])
            used.append((chain.head, count))
            offset += count
        assert ctx.complete_many is not None  # the mmio transport always batches
        ctx.complete_many(queue, used)
        self._pending = 0
        return True

    def close(self) -> None:
        for kernel in (self._vhost, self._vhost_spare):
            if kernel is not None:
                kernel.close()
        self._vhost = self._vhost_spare = None
        self.tap.close()
        if self._on_close:
            self._on_close()
            self._on_close = None

