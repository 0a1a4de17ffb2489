"""The virtio-mmio transport, version 2 registers (VIRTIO 1.x, 4.2.2), as an MMIO bus device.

The vCPU thread calls `read`/`write` for register accesses. Queue work happens on the
device's worker thread (`worker.py`), woken by an ioeventfd on QueueNotify; interrupts go out
through an irqfd. One lock serialises register changes against queue processing, so a reset
never races a request in flight.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import GuestMemoryError
from ..memory import GuestMemory
from .device import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    TRANSPORT_FEATURES,
    DeviceError,
    QueueContext,
    QueueHandoff,
    VirtioDevice,
)
from .queue import DescriptorChain, QueueError, QueueState, Virtqueue

log = logging.getLogger(__name__)

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4C54434D  # "MCTL"

# Register offsets
MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Device status bits (spec 2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 0x40, 0x80

# InterruptStatus bits
INT_USED_BUFFER, INT_CONFIG_CHANGE = 1, 2


@dataclass
class TransportState:
    """A virtio-mmio slot as its driver left it: registers, negotiated features, every queue's
    layout and indices, and the device model's own state (snapshots)."""

    device_id: int
    device_name: str
    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    config_generation: int
    broken: bool
    interrupt_status: int
    queues: list[QueueState]
    device: dict[str, Any] = field(default_factory=dict)


class TransportStateError(Exception):
    """A saved transport that does not fit this device (other kind, other queues, bad rings)."""


class VirtioMmioTransport:
    """One virtio-mmio slot. `irq` raises the slot's interrupt line (an irqfd write);
    `irq_fd` is that irqfd itself, for a device whose queues the kernel serves (vhost)."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, irq: Callable[[], None],
                 irq_fd: int | None = None) -> None:
        self.device = device
        self.memory = memory
        self.irq = irq
        self.irq_fd = irq_fd
        # Set by the worker: stop (False) or resume (True) waiting on the queues' notify fds.
        self.watch_queues: Callable[[bool], None] | None = None
        self.kernel_queues = False  # the device handed its queues to the kernel (vhost)
        # Set by the slot when an ioeventfd absorbs the driver's InterruptACK of the
        # used-buffer bit in the kernel (no exit to us): that bit then reads as always set.
        self.used_ack_in_kernel = False
        self.lock = threading.RLock()
        self.queues = [Virtqueue(memory, size) for size in device.queue_sizes]
        # One eventfd per queue: the ioeventfd target, and what a trapped QueueNotify writes.
        self.notify_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.queues]
        self.trapped_notifies = 0  # QueueNotify writes that came through an MMIO exit (inline queues aside)
        device.run_now = self.run_device_callback
        self.ctx = QueueContext(memory, self._complete, self._complete_many)
        self._interrupt_status = 0
        self._int_lock = threading.Lock()
        self._pending_irq = False
        self._reoffload = False  # queues taken back from the kernel for a snapshot
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.config_generation = 0
        self.broken = False  # set with DEVICE_NEEDS_RESET; queues are not touched until reset
        if self.kernel_queues:
            self.kernel_queues = False
            if self.watch_queues:
                self.watch_queues(True)
        with self._int_lock:
            self._interrupt_status = 0
        for queue in self.queues:
            queue.reset()

    @property
    def offered_features(self) -> int:
        return self.device.features | TRANSPORT_FEATURES

    @property
    def active(self) -> bool:
        return bool(self.status & DRIVER_OK) and not self.broken

    # --- bus device ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG:
            return self._read_config(offset - CONFIG, size)
        if size != 4 or offset % 4:
            return bytes(size)  # the spec allows only aligned 32-bit register reads
        return struct.pack("<I", self._read_register(offset) & 0xFFFFFFFF)

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG:
            with self.lock:
                self.device.write_config(offset - CONFIG, data)
            return
        if len(data) != 4 or offset % 4:
            return
        self._write_register(offset, struct.unpack("<I", data)[0])

    def close(self) -> None:
        for fd in self.notify_fds:
            os.close(fd)
        self.notify_fds = []
        self.device.close()

    # --- registers -----------------------------------------------------------------------
    def _read_register(self, offset: int) -> int:
        if offset == INTERRUPT_STATUS:
            with self._int_lock:
                # The kernel raises used-buffer interrupts straight through the irqfd and
                # cannot set this bit: report it always (a vring check with nothing new is
                # harmless to the driver).
                # Likewise when its ACK never reaches us (`used_ack_in_kernel`).
                sticky = self.kernel_queues or self.used_ack_in_kernel
                return self._interrupt_status | (INT_USED_BUFFER if sticky else 0)
        with self.lock:
            queue = self._selected_queue()
            if offset == MAGIC_VALUE:
                return MAGIC
            if offset == VERSION_REG:
                return VERSION
            if offset == DEVICE_ID:
                return self.device.device_id
            if offset == VENDOR:
                return VENDOR_ID
            if offset == DEVICE_FEATURES:
                return self.offered_features >> (32 * self.device_features_sel) if self.device_features_sel < 2 else 0
            if offset == QUEUE_NUM_MAX:
                return queue.max_size if queue else 0
            if offset == QUEUE_READY:
                return int(queue.ready) if queue else 0
            if offset == STATUS:
                return self.status
            if offset == CONFIG_GENERATION:
                return self.config_generation
            if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
                return 0xFFFFFFFF  # no shared memory regions
            return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == QUEUE_NOTIFY:
            self.notify(value)
            return
        if offset == INTERRUPT_ACK:
            with self._int_lock:
                self._interrupt_status &= ~value
            return
        with self.lock:
            if offset == STATUS:
                self._set_status(value)
            elif offset == DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            elif offset == DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == DRIVER_FEATURES:
                self._set_driver_features(value)
            elif offset == QUEUE_SEL:
                self.queue_sel = value
            elif offset in (QUEUE_NUM, QUEUE_READY, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW,
                            QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH):
                self._write_queue_register(offset, value)

    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _set_driver_features(self, value: int) -> None:
        # Features are writable only between DRIVER and FEATURES_OK (spec 3.1.1).
        if not self.status & DRIVER or self.status & FEATURES_OK or self.driver_features_sel > 1:
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _write_queue_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            return
        if offset == QUEUE_READY and value == 0:
            queue.ready = False  # the driver may always take a queue away (Linux does on teardown)
            return
        # Queue layout may change only after FEATURES_OK, before DRIVER_OK, while not ready.
        if self.broken or not self.status & FEATURES_OK or self.status & DRIVER_OK:
            return
        if offset == QUEUE_READY:
            if value == 1 and not queue.ready:
                try:
                    queue.activate(bool(self.driver_features & F_EVENT_IDX), bool(self.driver_features & F_INDIRECT_DESC))
                except QueueError as error:
                    self._needs_reset(f"queue {self.queue_sel}: {error}")
            return
        if queue.ready:
            return
        if offset == QUEUE_NUM:
            queue.size = value
        elif offset == QUEUE_DESC_LOW:
            queue.desc_table = (queue.desc_table & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DESC_HIGH:
            queue.desc_table = (queue.desc_table & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DRIVER_LOW:
            queue.avail_ring = (queue.avail_ring & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DRIVER_HIGH:
            queue.avail_ring = (queue.avail_ring & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DEVICE_LOW:
            queue.used_ring = (queue.used_ring & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DEVICE_HIGH:
            queue.used_ring = (queue.used_ring & 0xFFFFFFFF) | (value << 32)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        value &= 0xFF
        if value & ~self.status & ~(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED):
            return  # the driver cannot set DEVICE_NEEDS_RESET or unknown bits
        if self.status & ~value & ~DEVICE_NEEDS_RESET:
            return  # bits are only ever added, except by a reset
        added = value & ~self.status
        if added & FEATURES_OK and not self._features_acceptable():
            added &= ~FEATURES_OK  # the driver reads Status back and sees the refusal
        if added & DRIVER_OK and not self.status & FEATURES_OK and not added & FEATURES_OK:
            return  # DRIVER_OK before FEATURES_OK is out of order
        self.status |= added
        if added & DRIVER_OK and not self.broken:
            self.device.activate(self.driver_features, self.ctx)
            self._offload()
            for index in range(len(self.queues)):
                self._wake(index)  # buffers posted before DRIVER_OK are processed now (by us or the kernel)

    def _offload(self) -> None:
        """Let the device hand all its queues to the kernel, when it can and all are ready."""
        if self.irq_fd is None or not all(queue.ready for queue in self.queues):
            return
        handoffs = [QueueHandoff(queue, fd, self.irq_fd) for queue, fd in zip(self.queues, self.notify_fds)]
        if self.device.offload(self.driver_features, self.memory, handoffs):
            self.kernel_queues = True
            if self.watch_queues:
                self.watch_queues(False)

    def _features_acceptable(self) -> bool:
        if not self.status & DRIVER:
            return False
        if self.driver_features & ~self.offered_features:
            return False
        return bool(self.driver_features & F_VERSION_1)  # no legacy interface over v2 registers

    def reset(self) -> None:
        with self.lock:
            self.device.reset()
            self._reset_state()

    # --- snapshots -------------------------------------------------------------------------
    def quiesce(self) -> None:
        """With `lock` held: take the queues back from the kernel (vhost) so their indices are
        ours to save; `resume()` hands them over again."""
        if self.kernel_queues:
            self.device.reclaim(self.queues)
            self.kernel_queues = False
            self._reoffload = True

    def resume(self) -> None:
        if self._reoffload:
            self._reoffload = False
            self._offload()

    def save_state(self) -> TransportState:
        """With `lock` held and the transport quiesced (no queue work in flight)."""
        with self._int_lock:
            interrupt_status = self._interrupt_status
        return TransportState(
            self.device.device_id, self.device.name, self.status, self.device_features_sel, self.driver_features_sel,
            self.driver_features, self.queue_sel, self.config_generation, self.broken, interrupt_status,
            [queue.save_state(self.device.unconsumed(index)) for index, queue in enumerate(self.queues)],
            self.device.save_state(),
        )

    def restore_state(self, state: TransportState) -> None:
        """Put a freshly attached slot where the saved driver left it; the device resumes
        serving (its worker is woken for every queue) as if it had never stopped."""
        if state.device_id != self.device.device_id:
            raise TransportStateError(f"saved device is virtio-{state.device_name} (id {state.device_id}), "
                                      f"this slot has virtio-{self.device.name} (id {self.device.device_id})")
        if len(state.queues) != len(self.queues):
            raise TransportStateError(f"{len(state.queues)} saved queues, virtio-{self.device.name} has {len(self.queues)}")
        with self.lock:
            self._reset_state()
            self.status = state.status & 0xFF
            self.device_features_sel, self.driver_features_sel = state.device_features_sel, state.driver_features_sel
            self.driver_features, self.queue_sel = state.driver_features, state.queue_sel
            self.config_generation, self.broken = state.config_generation, state.broken
            if state.driver_features & ~self.offered_features:
                raise TransportStateError(f"saved driver features 0x{state.driver_features:x} are not all offered "
                                          f"by virtio-{self.device.name} (0x{self.offered_features:x})")
            for index, (queue, saved) in enumerate(zip(self.queues, state.queues)):
                if saved.size > queue.max_size:
                    raise TransportStateError(f"queue {index}: saved size {saved.size} exceeds {queue.max_size}")
                try:
                    queue.restore_state(saved)
                except QueueError as error:
                    raise TransportStateError(f"queue {index}: {error}") from None
            with self._int_lock:
                self._interrupt_status = state.interrupt_status & (INT_USED_BUFFER | INT_CONFIG_CHANGE)
            if self.active:
                self.device.activate(self.driver_features, self.ctx)
                try:
                    self.device.restore_state(state.device)
                except DeviceError as error:
                    raise TransportStateError(f"device: {error}") from None
                self._offload()
                for index in range(len(self.queues)):
                    self._wake(index)

    # --- config space --------------------------------------------------------------------
    def _read_config(self, offset: int, size: int) -> bytes:
        with self.lock:
            config = self.device.config_bytes()
        chunk = config[offset : offset + size]
        return chunk + bytes(size - len(chunk))

    def config_changed(self) -> None:
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self._interrupt(INT_CONFIG_CHANGE)

    # --- queues, called on the worker thread ----------------------------------------------
    def notify(self, index: int) -> None:
        """A kick that reached userspace (no ioeventfd matched): wake the worker the same way,
        or serve the queue right here when the device wants it inline."""
        if index in self.device.inline_queues:
            self.process_queue(index)
        elif index < len(self.notify_fds):
            self.trapped_notifies += 1
            self._wake(index)

    def _wake(self, index: int) -> None:
        if index < len(self.notify_fds):
            os.eventfd_write(self.notify_fds[index], 1)

    def process_queue(self, index: int) -> None:
        """Handle queue `index`; any rule the guest broke ends in DEVICE_NEEDS_RESET."""
        with self.lock:
            if not self.active or self.kernel_queues or index >= len(self.queues) or not self.queues[index].ready:
                return
            self._pending_irq = False
            try:
                self.device.process(index, self.queues[index], self.ctx)
            except (QueueError, DeviceError, GuestMemoryError) as error:
                self._needs_reset(f"queue {index}: {error}")
            except Exception:  # a device bug must not take the VMM down
                log.exception("%s: unexpected error processing queue %d", self.device.name, index)
                self._needs_reset(f"queue {index}: internal error")
            if self._pending_irq:
                self._pending_irq = False
                self._interrupt(INT_USED_BUFFER)

    def run_device_callback(self, callback: Callable[[], None]) -> None:
        """Run a device's host-side event (TAP readable...) under the same rules."""
        with self.lock:
            if not self.active:
                return
            self._pending_irq = False
            try:
                callback()
            except (QueueError, DeviceError, GuestMemoryError) as error:
                self._needs_reset(str(error))
            except Exception:
                log.exception("%s: unexpected error in a host event", self.device.name)
                self._needs_reset("internal error")
            if self._pending_irq:
                self._pending_irq = False
                self._interrupt(INT_USED_BUFFER)

    def _complete(self, queue: Virtqueue, chain: DescriptorChain, written: int) -> None:
        queue.add_used(chain.head, written)
        if queue.needs_interrupt():
            self._pending_irq = True  # one interrupt per batch, sent when the batch ends

    def _complete_many(self, queue: Virtqueue, entries: list[tuple[int, int]]) -> None:
        queue.add_used_many(entries)
        if queue.needs_interrupt():
            self._pending_irq = True

    def _interrupt(self, bits: int) -> None:
        with self._int_lock:
            self._interrupt_status |= bits
        self.irq()

    def _needs_reset(self, why: str) -> None:
        if not self.broken:
            log.warning("%s: guest driver error, device needs reset: %s", self.device.name, why)
        self.broken = True
        self.status |= DEVICE_NEEDS_RESET
        self._interrupt(INT_CONFIG_CHANGE)
