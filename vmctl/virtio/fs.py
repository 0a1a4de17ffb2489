"""virtio-fs (spec 5.11): a host folder as a FUSE file system the guest's virtiofs driver mounts.

Queue 0 is the high-priority queue (FORGET, BATCH_FORGET, INTERRUPT: no reply), queue 1 the
one request queue. Each chain carries a FUSE request in its readable part (`fuse_in_header`,
arguments, WRITE data) and room for the reply in its writable part (`fuse_out_header`,
READ data). The requests are answered by `vmctl.fs.server.FileServer`, the same server that
`vmctl share mount` puts on the host's /dev/fuse, one at a time on the device's worker thread.
No DAX window (no shared-memory region), no notification queue.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from ..fs import protocol
from ..fs.server import FileServer
from ..memory import GuestMemory
from .device import DeviceError, QueueContext, VirtioDevice
from .queue import DescriptorChain, Virtqueue, slice_views, split_front

log = logging.getLogger(__name__)

ID_FS = 26
HIPRIO, REQUEST = 0, 1
TAG_SIZE = 36
FAST_HEAD = 40 + 40  # fuse_in_header + fuse_read_in / fuse_write_in
REQUEST_QUEUE_SIZE = 256  # the guest derives max_pages from it; 128 KiB requests fit


class FsDevice(VirtioDevice):
    device_id = ID_FS
    queue_sizes = (64, REQUEST_QUEUE_SIZE)
    name = "fs"

    def __init__(self, root: str, tag: str, read_only: bool = False, cache: str = "auto") -> None:
        encoded = tag.encode()
        if not 0 < len(encoded) <= TAG_SIZE:
            raise ValueError(f"virtio-fs tag {tag!r}: 1..{TAG_SIZE} bytes")
        self.tag = encoded
        self.cache = cache
        self.server = FileServer(root, read_only, cache)
        self.requests = 0

    def config_bytes(self) -> bytes:
        return struct.pack(f"<{TAG_SIZE}sI", self.tag, 1)  # tag, num_request_queues

    def process(self, index: int, queue: Virtqueue, ctx: QueueContext) -> None:
        memory = ctx.memory
        for chain in queue.drain():
            if chain.readable_length < protocol.IN_HEADER.size:
                raise DeviceError(f"virtio-fs: request of {chain.readable_length} bytes has no fuse_in_header")
            head = chain.read_readable(memory, 0, FAST_HEAD)
            opcode = protocol.IN_HEADER.unpack_from(head)[1]
            if opcode in (protocol.READ, protocol.WRITE) and len(head) == FAST_HEAD:
                written = self._data(opcode, head, chain, memory)
                if written is not None:
                    self.requests += 1
                    ctx.complete(queue, chain, written)
                    continue
            answer = self.server.handle(chain.read_readable(memory))
            self.requests += 1
            if answer is None:
                ctx.complete(queue, chain, 0)
                continue
            if len(answer) > chain.writable_length:
                # The driver sized the reply buffer; a reply that does not fit is its mistake
                # for READ/READDIR (we never return more than asked) or a truncated header.
                unique = protocol.IN_HEADER.unpack_from(chain.read_readable(memory, 0, protocol.IN_HEADER.size))[2]
                answer = protocol.reply(unique, error=34)  # ERANGE
                if len(answer) > chain.writable_length:
                    raise DeviceError("virtio-fs: no room for a reply header")
            ctx.complete(queue, chain, chain.write_writable(memory, answer))

    def _data(self, opcode: int, head: bytes, chain: DescriptorChain, memory: GuestMemory) -> int | None:
        """READ/WRITE with the file data moved by preadv/pwritev straight between the file and
        guest memory (no copy through Python bytes); None: let the general path answer."""
        unique, nodeid = protocol.IN_HEADER.unpack_from(head)[2:4]
        fh, offset, size, *_ = protocol.READ_IN.unpack_from(head, protocol.IN_HEADER.size)
        out = chain.writable_views(memory)
        if sum(v.nbytes for v in out) < protocol.OUT_HEADER.size:
            return None
        header_views, data_views = split_front(out, protocol.OUT_HEADER.size)
        try:
            if opcode == protocol.READ:
                done = self.server.read_into(fh, slice_views(data_views, 0, min(size, 1 << 20)), offset, nodeid)
                payload_length = done
            else:
                data = slice_views(chain.readable_views(memory), FAST_HEAD, size)
                if sum(v.nbytes for v in data) != size:
                    return None  # short WRITE: the general path reports it
                done = self.server.write_from(fh, data, offset, nodeid)
                payload_length = protocol.WRITE_OUT.size
                _scatter(data_views, protocol.WRITE_OUT.pack(done, 0))
            header = protocol.OUT_HEADER.pack(protocol.OUT_HEADER.size + payload_length, 0, unique)
        except OSError as error:
            header = protocol.reply(unique, error=error.errno or 5)
            payload_length = 0
        except OverflowError:  # an offset of 2^63 or more: what Linux answers for it
            header = protocol.reply(unique, error=22)  # EINVAL
            payload_length = 0
        _scatter(header_views, header)
        return protocol.OUT_HEADER.size + payload_length

    def save_state(self) -> dict[str, Any]:
        next_node, next_handle = self.server.numbering()
        return {"next_node": next_node, "next_handle": next_handle}

    def restore_state(self, state: dict[str, Any]) -> None:
        """A clone serves its own folder with a new server: the numbers the saved guest holds
        stay unused (vmctl.fs.server.FileServer.skip_numbers)."""
        values = [state.get(key, 1) for key in ("next_node", "next_handle")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 1 << 63 for v in values):
            raise DeviceError(f"virtio-fs: bad saved numbering {state!r}")
        self.server.skip_numbers(*values)

    def reset(self) -> None:
        """A new driver starts with INIT again; the old one's nodes and handles are dropped."""
        root, read_only = self.server.root, self.server.read_only
        self.server.close()
        self.server = FileServer(root, read_only, self.cache)

    def close(self) -> None:
        self.server.close()


def _scatter(views: list[memoryview], data: bytes) -> None:
    done = 0
    for view in views:
        if done >= len(data):
            return
        count = min(view.nbytes, len(data) - done)
        view[:count] = data[done : done + count]
        done += count
