"""Ready-made `MmioDeviceFactory`s for `MachineConfig.devices` and the CLI."""

from __future__ import annotations

from pathlib import Path

from ..errors import VmctlError
from .device import VirtioDevice
from .slot import VirtioMmioFactory

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


def parse_disk_option(spec: str) -> VirtioMmioFactory:
    """`PATH[,ro]` (also `,rw`, `,serial=ID`) from `vmctl boot --disk`."""
    path, *options = spec.split(",")
    read_only, serial = False, None
    for option in options:
        if option in ("ro", "readonly"):
            read_only = True
        elif option == "rw":
            read_only = False
        elif option.startswith("serial="):
            serial = option[len("serial="):]
        else:
            raise VmctlError(f"--disk {spec}: unknown option {option!r} (ro, rw, serial=ID)")
    if not path:
        raise VmctlError(f"--disk {spec}: no path")
    if not Path(path).is_file():
        raise VmctlError(f"--disk {path}: no such file")
    return block(path, read_only, serial)


def cli_devices(args: object) -> list[VirtioMmioFactory]:
    """The virtio slots `vmctl boot` options ask for: disks first (slot order = vda, vdb...)."""
    devices = [parse_disk_option(spec) for spec in getattr(args, "disk", [])]
    if getattr(args, "rng", False):
        devices.append(rng())
    if getattr(args, "console_channel", None):
        devices.append(console(args.console_channel))
    net = getattr(args, "net", "none")
    if net and net != "none":
        devices.append(NetFactory(net))
    return devices


def cli_cmdline_words(devices: list[VirtioMmioFactory]) -> list[str]:
    """Kernel parameters the devices need (the guest's `ip=` for a network)."""
    return [word for device in devices if isinstance(device, NetFactory) for word in device.cmdline_words()]


class NetFactory(VirtioMmioFactory):
    """virtio-net on a fresh TAP. The host side is set up when the factory is made, so the
    guest's `ip=` parameter is known before the kernel command line is written; it is torn
    down when the device closes (or by `release()` if the VM never got built)."""

    def __init__(self, mode: str = "isolated", mac: str | None = None) -> None:
        from ..net.host import HostNetwork, random_mac
        self.network = HostNetwork(mode, mac or random_mac()).open()
        super().__init__(self._make, f"net:{mode}")

    def _make(self) -> VirtioDevice:
        from .net import NetDevice
        return NetDevice(self.network.tap, self.network.mac, on_close=self.network.close)

    def cmdline_words(self) -> list[str]:
        return [self.network.kernel_ip_parameter()]

    def release(self) -> None:
        self.network.close()
