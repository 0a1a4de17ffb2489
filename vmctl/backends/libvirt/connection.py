"""Opening libvirt connections, and turning libvirt's errors into one-line VmctlErrors."""

from __future__ import annotations

import contextlib
import shutil
from types import ModuleType
from typing import Any, Iterator
from urllib.parse import urlsplit

from ...errors import VmctlError

INSTALL_HINT = ("pip install 'vmctl[libvirt]' (libvirt-python builds against the Debian packages "
                "libvirt-dev and pkg-config), or run scripts/libvirt-setup")


def libvirt_module() -> ModuleType:
    try:
        import libvirt
    except ImportError:
        raise VmctlError(f"the libvirt backend needs libvirt-python: {INSTALL_HINT}") from None
    # libvirt prints every error to stderr by default; we raise them instead.
    libvirt.registerErrorHandler(lambda context, error: None, None)
    return libvirt


def is_remote(uri: str) -> bool:
    """A URI with a host part (qemu+ssh://host/system) runs machines on another host."""
    return bool(urlsplit(uri).hostname)


def message(error: Exception) -> str:
    """libvirt's message, on one line."""
    text = error.get_error_message() if hasattr(error, "get_error_message") else str(error)
    text = " ".join(str(text or error).split())
    if "virtlogd-sock" in text:
        text += " (virtlogd is not running: systemctl start virtlogd, or `virtlogd -d`)"
    return text


def connect(uri: str, machine: str) -> Any:
    libvirt = libvirt_module()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as error:
        text = message(error)
        if not is_remote(uri) and uri.startswith("qemu") and ("No such file" in text or "Connection refused" in text):
            if shutil.which("libvirtd") is None:
                raise VmctlError(f"{machine}: libvirtd is not installed (Debian: apt-get install "
                                 f"libvirt-daemon-system qemu-system-x86 dnsmasq-base)") from None
            raise VmctlError(f"{machine}: libvirtd is not running at {uri} (start it: systemctl start "
                             f"libvirtd, or `libvirtd -d` without systemd)") from None
        raise VmctlError(f"{machine}: cannot reach libvirt at {uri}: {text}") from None


@contextlib.contextmanager
def translated(machine: str, action: str) -> Iterator[None]:
    """Re-raise a libvirtError from the block as `<machine>: <action>: <message>`."""
    libvirt = libvirt_module()
    try:
        yield
    except libvirt.libvirtError as error:
        raise VmctlError(f"{machine}: {action}: {message(error)}") from None


def not_found(error: Exception) -> bool:
    libvirt = libvirt_module()
    return isinstance(error, libvirt.libvirtError) and error.get_error_code() in (
        libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL,
        libvirt.VIR_ERR_NO_NETWORK)
