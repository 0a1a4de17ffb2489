"""Render a resolved machine (a `DomainPlan`) to libvirt domain XML, with xml.etree only.

The plan holds nothing but decided values (paths, formats, MAC, CID), so rendering is a pure
function: the golden-file tests pin it down, and the backend only has to build the plan.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

# vmctl's own namespace in <metadata>: which machine and state folder a domain belongs to.
METADATA_NS = "https://vmctl.dev/xmlns/libvirt-machine/1"
ET.register_namespace("vmctl", METADATA_NS)


@dataclass(frozen=True)
class DiskLayer:
    path: str
    format: str  # qcow2 | raw


@dataclass(frozen=True)
class DiskPlan:
    target: str  # vda, vdb, …
    layers: tuple[DiskLayer, ...]  # the file the guest opens first, then its backing chain
    read_only: bool = False


@dataclass(frozen=True)
class FilesystemPlan:
    """A host folder for the guest over QEMU's virtio-9p (libvirt `<filesystem>`, passthrough)."""

    source: str
    tag: str  # the guest mounts `-t 9p TAG`
    read_only: bool = False


@dataclass(frozen=True)
class NicPlan:
    kind: str  # network | bridge | ethernet
    source: str  # libvirt network name, host bridge name, or (ethernet) the TAP vmctl made
    mac: str


@dataclass(frozen=True)
class DomainPlan:
    machine: str  # the vmctl machine name
    name: str  # the libvirt domain name
    uuid: str
    domain_type: str  # kvm | qemu | test
    cpus: int
    memory: int  # bytes
    console_log: str  # serial port 0 (ttyS0) is appended to this file on the libvirt host
    kernel: str | None = None  # None: boot from the first disk
    initrd: str | None = None
    cmdline: str | None = None
    disks: tuple[DiskPlan, ...] = ()
    filesystems: tuple[FilesystemPlan, ...] = ()
    nic: NicPlan | None = None
    agent_socket: str | None = None  # serial port 1 (ttyS1, the exec agent's fallback) as a unix socket
    agent_console: str | None = None  # a virtio console (guest hvc0, the exec agent) as a unix socket
    vsock_cid: int | None = None  # 0: libvirt picks the CID
    run_as: tuple[int, int] | None = None  # uid, gid QEMU runs as (no relabelling of our files)
    state_folder: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # more metadata attributes


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attributes.items()})
    if text is not None:
        element.text = text
    return element


def render(plan: DomainPlan) -> str:
    domain = ET.Element("domain", type=plan.domain_type)
    _sub(domain, "name", plan.name)
    _sub(domain, "uuid", plan.uuid)
    _sub(domain, "title", f"vmctl machine {plan.machine}")
    metadata = _sub(domain, "metadata")
    ET.SubElement(metadata, f"{{{METADATA_NS}}}machine",
                  {"name": plan.machine, "state": plan.state_folder, **plan.extra})
    # libvirt counts KiB; round up so the guest never gets less than asked.
    _sub(domain, "memory", str(-(-plan.memory // 1024)), unit="KiB")
    _sub(domain, "vcpu", str(plan.cpus), placement="static")
    _render_os(domain, plan)
    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    _sub(domain, "clock", offset="utc")
    # A guest that powers off, reboots or crashes has ended, as with the native VMM
    # (the reference /init reboots after its command).
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(domain, event, "destroy")
    devices = _sub(domain, "devices")
    for disk in plan.disks:
        _render_disk(devices, disk)
    for share in plan.filesystems:
        element = _sub(devices, "filesystem", type="mount", accessmode="passthrough")
        _sub(element, "driver", type="path")
        _sub(element, "source", dir=share.source)
        _sub(element, "target", dir=share.tag)
        if share.read_only:
            _sub(element, "readonly")
    if plan.nic is not None:
        _render_nic(devices, plan.nic)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=plan.console_log, append="on")
    _sub(serial, "target", port="0")
    if plan.agent_socket is not None:
        agent = _sub(devices, "serial", type="unix")
        _sub(agent, "source", mode="bind", path=plan.agent_socket)
        _sub(agent, "target", port="1")
    if plan.agent_console is not None:
        # The agent's own port: virtio-console moves a page per VM exit where the UART takes an
        # exit per byte. libvirt puts it on a virtio-serial controller; the first virtio
        # console is the guest's hvc0 (the serial console stays console 0, ttyS0).
        agent = _sub(devices, "console", type="unix")
        _sub(agent, "source", mode="bind", path=plan.agent_console)
        _sub(agent, "target", type="virtio")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    if plan.vsock_cid is not None:
        vsock = _sub(devices, "vsock", model="virtio")
        if plan.vsock_cid:
            _sub(vsock, "cid", auto="no", address=str(plan.vsock_cid))
        else:
            _sub(vsock, "cid", auto="yes")
    _sub(devices, "memballoon", model="none")
    if plan.run_as is not None:
        # QEMU runs as the user who started the machine (as the native VMM does), so it can
        # read the state folder; relabel=no: libvirt leaves our files' owners alone.
        label = _sub(domain, "seclabel", type="static", model="dac", relabel="no")
        _sub(label, "label", f"+{plan.run_as[0]}:+{plan.run_as[1]}")
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def _render_os(domain: ET.Element, plan: DomainPlan) -> None:
    os_element = _sub(domain, "os")
    _sub(os_element, "type", "hvm", arch="x86_64")
    if plan.kernel is None:
        _sub(os_element, "boot", dev="hd")
        return
    _sub(os_element, "kernel", plan.kernel)
    if plan.initrd:
        _sub(os_element, "initrd", plan.initrd)
    if plan.cmdline:
        _sub(os_element, "cmdline", plan.cmdline)


def _render_disk(devices: ET.Element, disk: DiskPlan) -> None:
    element = _sub(devices, "disk", type="file", device="disk")
    top, *chain = disk.layers
    _sub(element, "driver", name="qemu", type=top.format, discard="unmap")
    _sub(element, "source", file=top.path)
    # The whole chain is spelled out, so libvirt neither probes formats nor guesses paths.
    parent = element
    for layer in chain:
        parent = _sub(parent, "backingStore", type="file")
        _sub(parent, "format", type=layer.format)
        _sub(parent, "source", file=layer.path)
    _sub(parent, "backingStore")  # the chain ends here
    _sub(element, "target", dev=disk.target, bus="virtio")
    if disk.read_only:
        _sub(element, "readonly")


def _render_nic(devices: ET.Element, nic: NicPlan) -> None:
    element = _sub(devices, "interface", type=nic.kind)
    _sub(element, "mac", address=nic.mac)
    if nic.kind == "bridge":
        _sub(element, "source", bridge=nic.source)
    elif nic.kind == "ethernet":
        _sub(element, "target", dev=nic.source, managed="no")  # QEMU opens vmctl's TAP as it is
    else:
        _sub(element, "source", network=nic.source)
    _sub(element, "model", type="virtio")


def machine_of(xml_text: str) -> dict[str, str] | None:
    """The vmctl metadata of a domain's XML (name, state, …), or None for a foreign domain."""
    found = ET.fromstring(xml_text).find(f"metadata/{{{METADATA_NS}}}machine")
    return dict(found.attrib) if found is not None else None
