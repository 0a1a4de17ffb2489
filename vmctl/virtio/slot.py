"""Plugging a virtio device into a machine's virtio-mmio slot.

`VirtioMmioFactory(make_device).attach(host, base, gsi)` builds the transport, wires each
queue's notify eventfd to QueueNotify with KVM_IOEVENTFD (datamatch = queue index, so a kick
never exits to userspace), takes the slot's irqfd line, and starts the device's worker.
`host` is anything that offers `VirtioHost` (the VMM's `Machine`): virtio does not know the VMM.

The driver's InterruptACK of the used-buffer bit (Linux writes it once per interrupt, right
after reading InterruptStatus) is absorbed by one more ioeventfd that nobody reads: the write
completes in the kernel instead of costing an exit into Python on the vCPU thread. The
transport then reports that bit as always set, which the spec's drivers tolerate (they
check the rings and find nothing new), the same contract as with vhost.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..memory import GuestMemory
from .device import VirtioDevice
from .mmio import INT_USED_BUFFER, INTERRUPT_ACK, QUEUE_NOTIFY, VirtioMmioTransport
from .worker import DeviceWorker

log = logging.getLogger(__name__)


class InterruptLine(Protocol):
    """An edge-triggered interrupt: `trigger()` raises it; `eventfd` is the irqfd behind it."""

    @property
    def eventfd(self) -> int: ...

    def trigger(self) -> None: ...


class VirtioHost(Protocol):
    """What a virtio-mmio slot needs from the machine it is plugged into."""

    def guest_memory(self) -> GuestMemory: ...

    def vcpu_count(self) -> int: ...

    def irq_line(self, gsi: int) -> InterruptLine: ...

    def register_ioeventfd(self, eventfd: int, address: int, length: int, datamatch: int | None = None) -> None: ...

    def map_device_memory(self, host_address: int, size: int) -> int:
        """Map `size` bytes of host memory read-only into guest-physical space above RAM and
        the device range (a KVM_MEM_READONLY slot); returns the guest address."""
        ...


class VirtioMmioSlot:
    """The `MmioDevice` the machine puts on its MMIO bus."""

    def __init__(self, transport: VirtioMmioTransport, worker: DeviceWorker, ack_fd: int = -1) -> None:
        self.transport = transport
        self.worker = worker
        self.ack_fd = ack_fd  # the InterruptACK ioeventfd's target (never read)

    @property
    def device(self) -> VirtioDevice:
        return self.transport.device

    def read(self, offset: int, size: int) -> bytes:
        return self.transport.read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.transport.write(offset, data)

    def close(self) -> None:
        self.worker.stop()
        self.transport.close()
        if self.ack_fd >= 0:
            os.close(self.ack_fd)  # KVM keeps its own reference until the VM fd closes
            self.ack_fd = -1


@dataclass
class VirtioMmioFactory:
    """A `MmioDeviceFactory`: `make` creates the device model when the VM is built."""

    make: Callable[[], VirtioDevice]
    label: str = "virtio"
    # The slot of the last attach, so callers can inspect the device after the run.
    attached: VirtioMmioSlot | None = field(default=None, init=False, repr=False)

    def attach(self, host: VirtioHost, base: int, gsi: int) -> VirtioMmioSlot:
        device = self.make()
        try:
            device.fit_machine(host.vcpu_count())
            if (shared := device.shared_memory()) is not None:
                device.place(host.map_device_memory(*shared))
            line = host.irq_line(gsi)
            transport = VirtioMmioTransport(device, host.guest_memory(), line.trigger, irq_fd=line.eventfd)
        except BaseException:
            device.close()
            raise
        ack_fd = -1
        try:
            for index, fd in enumerate(transport.notify_fds):
                if index not in device.inline_queues:  # those exit to the vCPU thread instead
                    host.register_ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=index)
            ack_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            host.register_ioeventfd(ack_fd, base + INTERRUPT_ACK, 4, datamatch=INT_USED_BUFFER)
            transport.used_ack_in_kernel = True
            worker = DeviceWorker(transport, f"virtio-{device.name}@{base:x}")
        except BaseException:
            transport.close()
            if ack_fd >= 0:
                os.close(ack_fd)
            raise
        worker.start()
        log.info("virtio-%s at 0x%x, GSI %d", device.name, base, gsi)
        self.attached = VirtioMmioSlot(transport, worker, ack_fd)
        return self.attached
