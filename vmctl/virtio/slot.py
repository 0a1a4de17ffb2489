"""Plugging a virtio device into a machine's virtio-mmio slot.

`VirtioMmioFactory(make_device).attach(machine, base, gsi)` builds the transport, wires each
queue's notify eventfd to QueueNotify with KVM_IOEVENTFD (datamatch = queue index, so a kick
never exits to userspace), takes the slot's irqfd line, and starts the device's worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .device import VirtioDevice
from .mmio import QUEUE_NOTIFY, VirtioMmioTransport
from .worker import DeviceWorker

if TYPE_CHECKING:
    from ..vmm.machine import Machine

log = logging.getLogger(__name__)


class VirtioMmioSlot:
    """The `MmioDevice` the machine puts on its MMIO bus."""

    def __init__(self, transport: VirtioMmioTransport, worker: DeviceWorker) -> None:
        self.transport = transport
        self.worker = worker

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


@dataclass
class VirtioMmioFactory:
    """A `MmioDeviceFactory`: `make` creates the device model when the VM is built."""

    make: Callable[[], VirtioDevice]
    label: str = "virtio"
    # The slot of the last attach, so callers can inspect the device after the run.
    attached: VirtioMmioSlot | None = field(default=None, init=False, repr=False)

    def attach(self, machine: "Machine", base: int, gsi: int) -> VirtioMmioSlot:
        device = self.make()
        try:
            line = machine.irq_line(gsi)
            transport = VirtioMmioTransport(device, machine.memory, line.trigger, irq_fd=line.eventfd)
        except BaseException:
            device.close()
            raise
        try:
            for index, fd in enumerate(transport.notify_fds):
                machine.vm.register_ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=index)
            worker = DeviceWorker(transport, f"virtio-{device.name}@{base:x}")
        except BaseException:
            transport.close()
            raise
        worker.start()
        log.info("virtio-%s at 0x%x, GSI %d", device.name, base, gsi)
        self.attached = VirtioMmioSlot(transport, worker)
        return self.attached
