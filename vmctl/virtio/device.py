"""What every virtio device model implements, independent of the transport.

A device sees its queues only through `VirtioDevice.process(index, queue, ctx)`, called on
the device's worker thread when the driver kicks that queue. The transport owns feature
negotiation, status, reset and interrupts.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable

from ..memory import GuestMemory
from .queue import DescriptorChain, Virtqueue

# Device-independent feature bits (spec 6).
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = F_INDIRECT_DESC | F_EVENT_IDX | F_VERSION_1

# Device IDs (spec 5).
ID_NET = 1
ID_BLOCK = 2
ID_CONSOLE = 3
ID_RNG = 4
ID_VSOCK = 19
ID_PMEM = 27


class DeviceError(Exception):
    """A request the device cannot process because the guest broke the device's rules.

    Like `QueueError`, it puts the device into DEVICE_NEEDS_RESET."""


@dataclass
class QueueContext:
    """What a device needs while it processes a queue: guest memory, and a way to complete
    a chain (which also decides, per EVENT_IDX, whether to interrupt)."""

    memory: GuestMemory
    complete: Callable[[Virtqueue, DescriptorChain, int], None]
    # Several chains at once, as (head, bytes written): one used-index update for all.
    complete_many: Callable[[Virtqueue, list[tuple[int, int]]], None] | None = None


@dataclass(frozen=True)
class QueueHandoff:
    """One ready virtqueue and the eventfds that let the host kernel serve it without us."""

    queue: Virtqueue
    kick_fd: int  # the queue's ioeventfd target: the driver's QueueNotify writes
    call_fd: int  # the slot's irqfd: writing it interrupts the guest


class VirtioDevice(abc.ABC):
    device_id: int
    queue_sizes: tuple[int, ...]
    name: str = "virtio"
    # Queues served on the vCPU thread whose QueueNotify write kicked them (no ioeventfd):
    # for a driver that spins until each buffer comes back (Linux's hvc put_chars), the
    # hop to the worker thread and back is the whole cost of a buffer.
    inline_queues: tuple[int, ...] = ()

    @property
    def features(self) -> int:
        """Feature bits offered; the transport adds TRANSPORT_FEATURES."""
        return 0

    def config_bytes(self) -> bytes:
        """The device-specific configuration space (little-endian struct)."""
        return b""

    def fit_machine(self, cpus: int) -> None:
        """Before the transport is built: size per-vCPU resources (queues) for a machine
        of `cpus` vCPUs. The default has nothing to size."""

    def shared_memory(self) -> tuple[int, int] | None:
        """(host address, size) of host memory the device maps into guest-physical space
        (virtio-pmem), or None. The transport's host places it and calls `place`."""
        return None

    def place(self, guest_address: int) -> None:
        """Where `shared_memory` landed in guest-physical space (before the driver reads
        the config space)."""

    def write_config(self, offset: int, data: bytes) -> None:
        """Drivers rarely write config; the default ignores it."""

    def activate(self, features: int, ctx: QueueContext) -> None:
        """DRIVER_OK: the negotiated features are final, queues are set up."""

    def offload(self, features: int, memory: GuestMemory, queues: list[QueueHandoff]) -> bool:
        """Right after `activate`: hand every queue to the host kernel (vhost)? True means the
        kernel serves them from now on, and the transport stops processing them until
        `reset`, which must take them back. The default keeps them in Python."""
        return False

    @abc.abstractmethod
    def process(self, index: int, queue: Virtqueue, ctx: QueueContext) -> None:
        """Handle every available chain of queue `index` (pop until None, complete each)."""

    def extra_fds(self) -> dict[int, Callable[[], None]]:
        """Host fds the worker should also wait on (a TAP device, a socket), with handlers."""
        return {}

    # Set by the worker: add or remove a host fd while the device runs (a new connection).
    watch: Callable[[int, Callable[[], None]], None] | None = None
    unwatch: Callable[[int], None] | None = None
    # Set by the transport: run a host-side event now, on the caller's thread, under the
    # transport's rules (its lock; interrupts sent after); nothing while the driver is not up.
    run_now: Callable[[Callable[[], None]], None] | None = None

    # --- snapshots ---------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        """Device-specific state beyond the transport's (JSON values); the default has none."""
        return {}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Take `save_state`'s output, after the transport restored the queues."""

    def unconsumed(self, index: int) -> int:
        """Chains of queue `index` the device took from the ring and still holds, uncompleted."""
        return 0

    def reclaim(self, queues: list[Virtqueue]) -> None:
        """Take queues back from the host kernel (see `offload`), their indices synced, so the
        VMM can save them; the transport offloads them again if the machine goes on."""

    def reset(self) -> None:
        """Forget per-driver state (the driver wrote 0 to Status)."""

    def close(self) -> None:
        """Release host resources (files, TAP fds)."""
