"""virtio-rng (entropy device, spec 5.4): fills each writable buffer from the host's urandom."""

from __future__ import annotations

import os

from .device import ID_RNG, QueueContext, VirtioDevice
from .queue import Virtqueue

# Bytes per request at most: a driver asking for more just gets a shorter answer,
# and one request cannot pin the worker for long.
MAX_REQUEST = 64 * 1024


class RngDevice(VirtioDevice):
    device_id = ID_RNG
    queue_sizes = (256,)
    name = "rng"

    def __init__(self, source: str = "/dev/urandom") -> None:
        self.fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)

    def process(self, index: int, queue: Virtqueue, ctx: QueueContext) -> None:
        for chain in queue.drain():
            written = 0
            for view in chain.writable_views(ctx.memory):
                want = min(view.nbytes, MAX_REQUEST - written)
                if want <= 0:
                    break
                written += os.readv(self.fd, [view[:want]])
            ctx.complete(queue, chain, written)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
