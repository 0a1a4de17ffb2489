"""Ready-made `MmioDeviceFactory`s for `MachineConfig.devices` (the CLI turns options into these)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .device import VirtioDevice
from .slot import VirtioMmioFactory

if TYPE_CHECKING:
    from .net import NetDevice

# Device modules (and the disk and network layers behind them) are imported when a VM
# actually gets that device: `vmctl boot` of a bare kernel starts faster without them.


def block(path: str | Path, read_only: bool = False, serial: str | None = None) -> VirtioMmioFactory:
    """virtio-blk over a raw or qcow2 image; the image is opened (and locked) when the VM is built."""
    def make() -> VirtioDevice:
        from .blk import open_block_device
        return open_block_device(str(path), read_only, serial)
    return VirtioMmioFactory(make, f"blk:{path}")


def rng() -> VirtioMmioFactory:
    def make() -> VirtioDevice:
        from .rng import RngDevice
        return RngDevice()
    return VirtioMmioFactory(make, "rng")


def console(socket_path: str | Path) -> VirtioMmioFactory:
    """virtio-console (guest /dev/hvc0) connected to a Unix socket vmctl listens on."""
    def make() -> VirtioDevice:
        from .console import ConsoleDevice
        return ConsoleDevice(str(socket_path))
    return VirtioMmioFactory(make, f"console:{socket_path}")


def fs(host_dir: str | Path, tag: str, read_only: bool = False, cache: str = "auto") -> VirtioMmioFactory:
    """virtio-fs serving `host_dir`; the guest mounts it with `mount -t virtiofs TAG DIR`."""
    def make() -> VirtioDevice:
        from .fs import FsDevice
        return FsDevice(str(host_dir), tag, read_only, cache)
    return VirtioMmioFactory(make, f"fs:{tag}")


def pmem(path: str | Path) -> VirtioMmioFactory:
    """virtio-pmem over a file, read-only: the guest's /dev/pmemN (mount it `-o ro,dax`)."""
    def make() -> VirtioDevice:
        from .pmem import PmemDevice
        return PmemDevice(str(path))
    return VirtioMmioFactory(make, f"pmem:{path}")


class NetFactory(VirtioMmioFactory):
    """virtio-net on a fresh TAP. The host side is set up when the factory is made, so the
    guest's `ip=` parameter is known before the kernel command line is written; it is torn
    down when the device closes (or by `release()` if the VM never got built)."""

    def __init__(self, mode: str = "isolated", mac: str | None = None) -> None:
        from ..net.host import HostNetwork, random_mac
        self.network = HostNetwork(mode, mac or random_mac()).open()
        self.device: NetDevice | None = None
        super().__init__(self._make, f"net:{mode}")

    def _make(self) -> VirtioDevice:
        from .net import NetDevice
        assert self.network.tap is not None, "the host network is open"
        self.device = NetDevice(self.network.tap, self.network.mac, on_close=self.network.close)
        return self.device

    def before_sandbox(self) -> list[str]:
        """What the device must open while the process still may (vmm/sandbox.py)."""
        return self.device.before_sandbox() if self.device is not None else []

    def cmdline_words(self) -> list[str]:
        return [self.network.kernel_ip_parameter()]

    def release(self) -> None:
        self.network.close()
