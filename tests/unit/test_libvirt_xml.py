"""Domain XML of the libvirt backend: golden files for every spec field, parsed back."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmctl.backends.libvirt.disks import local_disks, target_name
from vmctl.backends.libvirt.domain_xml import machine_of, render
from vmctl.backends.libvirt.plan import default_mac, domain_plan
from vmctl.disk.qcow2.create import create, create_overlay
from vmctl.errors import VmctlError
from vmctl.guest_contract import GUEST_AGENT, decode_script
from vmctl.spec import parse_spec

GOLDEN = Path(__file__).parent / "golden" / "libvirt"
UUID = "6b1c2f4e-0d2a-4c55-9a51-2f0e8d3c7a10"
UPDATE = os.environ.get("VMCTL_UPDATE_GOLDEN") == "1"  # rewrite the golden files instead of comparing


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A kernel, an initrd, a raw base, and a qcow2 base that itself sits on the raw one."""
    (tmp_path / "bzImage").write_bytes(b"kernel")
    (tmp_path / "initrd.cpio").write_bytes(b"initrd")
    (tmp_path / "root.raw").write_bytes(bytes(1 << 20))
    create_overlay(str(tmp_path / "root.raw"), str(tmp_path / "base.qcow2"))
    create(str(tmp_path / "data.qcow2"), 8 << 20)
    return tmp_path


def plan_xml(files: Path, document: str, *, run_as=(0, 0), domain_type=None, tap=None, extra_words=()) -> tuple[str, str]:
    spec = parse_spec(document, source=str(files / "vm.yaml"), base_dir=files).machines[0]
    folder = files / "state"
    folder.mkdir(exist_ok=True)
    plan = domain_plan(spec, uuid=UUID, domain_type=domain_type or spec.libvirt.domain_type,
                       disks=local_disks(spec, folder), console_log=str(folder / "console.log"),
                       agent_socket=str(folder / "agent.sock"), run_as=run_as, state_folder=str(folder),
                       tap=tap, extra_words=extra_words, agent_console=str(folder / "agent-hvc.sock"))
    xml = render(plan)
    return xml, xml.replace(str(files), "/SPEC")  # stable paths for the golden file


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.xml"
    if UPDATE:
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs (VMCTL_UPDATE_GOLDEN=1 rewrites it)"


KERNEL_BOOT = """
name: web
backend: libvirt
cpus: 2
memory: 1G
kernel: bzImage
initrd: initrd.cpio
cmdline: console=ttyS0 quiet
command: [uname, -a]
environment: {GREETING: hello}
"""


def test_direct_kernel_boot(files):
    xml, stable = plan_xml(files, KERNEL_BOOT)
    check_golden("kernel-boot", stable)
    root = ET.fromstring(xml)
    assert root.get("type") == "kvm" and root.findtext("name") == "vmctl-web" and root.findtext("uuid") == UUID
    assert root.findtext("vcpu") == "2"
    assert root.find("memory").get("unit") == "KiB" and int(root.findtext("memory")) == 1 << 20
    assert root.findtext("os/kernel") == str(files / "bzImage")
    assert root.findtext("os/initrd") == str(files / "initrd.cpio")
    cmdline = root.findtext("os/cmdline")
    words = cmdline.split()
    assert words[:6] == ["console=ttyS0", "quiet", "8250.nr_uarts=2", "vmctl.agent=hvc0", "vmctl.hostname=web", words[5]]
    script = decode_script(words[5].removeprefix("vmctl.cmd="))  # the exec agent on hvc0 or COM2, then the command
    assert script.startswith(GUEST_AGENT) and script.endswith("export GREETING=hello\nuname -a </dev/null")
    assert root.find("os/boot") is None
    assert [root.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    consoles = root.findall("devices/serial")
    assert consoles[0].get("type") == "file" and consoles[0].find("source").get("path").endswith("state/console.log")
    assert consoles[1].get("type") == "unix" and consoles[1].find("target").get("port") == "1"  # COM2: the fallback
    agent = root.findall("devices/console")  # the agent's port: the guest's first virtio console, hvc0
    assert [(c.get("type"), c.find("target").get("type")) for c in agent] == [("unix", "virtio")]
    assert agent[0].find("source").attrib == {"mode": "bind", "path": str(files / "state/agent-hvc.sock")}
    assert root.find("devices/rng").get("model") == "virtio"
    assert root.find("devices/interface") is None and root.find("devices/vsock") is None
    assert root.find("seclabel/label").text == "+0:+0"
    assert machine_of(xml) == {"name": "web", "state": str(files / "state")}


def test_memory_rounds_up_to_kib(files):
    xml, _ = plan_xml(files, KERNEL_BOOT.replace("memory: 1G", "memory: 16777217"))
    assert ET.fromstring(xml).findtext("memory") == str((16 << 10) + 1)


DISKS = """
name: db
backend: libvirt
disks:
  - base.qcow2
  - {image: root.raw, read_only: true}
  - {image: base.qcow2, size: 4M}
  - {size: 2M}
  - {image: data.qcow2, overlay: false}
"""


def test_disks_overlays_and_backing_chains(files):
    xml, stable = plan_xml(files, DISKS)
    check_golden("disks", stable)
    disks = ET.fromstring(xml).findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb", "vdc", "vdd", "vde"]
    assert all(d.find("target").get("bus") == "virtio" for d in disks)

    def chain(disk):
        layers = [(disk.find("driver").get("type"), disk.find("source").get("file"))]
        node = disk.find("backingStore")
        while node is not None and node.find("source") is not None:
            layers.append((node.find("format").get("type"), node.find("source").get("file")))
            node = node.find("backingStore")
        assert node is not None and len(node) == 0  # the chain ends with an empty <backingStore/>
        return layers

    state, raw, base = files / "state" / "disks", str(files / "root.raw"), str(files / "base.qcow2")
    # vda: our overlay -> the qcow2 base -> its raw base
    assert chain(disks[0]) == [("qcow2", str(state / "vda.qcow2")), ("qcow2", base), ("raw", raw)]
    # vdb: read-only: the base itself, no overlay
    assert chain(disks[1]) == [("raw", raw)] and disks[1].find("readonly") is not None
    assert not (state / "vdb.qcow2").exists()
    assert chain(disks[2])[0] == ("qcow2", str(state / "vdc.qcow2"))
    assert chain(disks[3]) == [("qcow2", str(state / "vdd.qcow2"))]
    assert chain(disks[4]) == [("qcow2", str(files / "data.qcow2"))]
    assert all(d.find("readonly") is None for d in disks if d is not disks[1])
    assert ET.fromstring(xml).find("os/boot").get("dev") == "hd" and ET.fromstring(xml).find("os/kernel") is None


def test_overlays_are_real_qcow2_on_the_base(files):
    from vmctl.disk import open_disk

    plan_xml(files, DISKS)
    overlay = open_disk(str(files / "state/disks/vdc.qcow2"), read_only=True, lock=False)
    try:
        assert overlay.size == 4 << 20 and overlay.header.backing_file == str(files / "base.qcow2")
    finally:
        overlay.close()


NETWORKS = [
    ("nat", "network: nat", ("network", "network", "default")),
    ("nat-libvirt-network", "network: nat\nlibvirt: {network: lab}", ("network", "network", "lab")),
    ("isolated-bridge", "network: {mode: isolated, mac: '52:54:00:00:00:2a'}\nlibvirt: {bridge: br0}", ("bridge", "bridge", "br0")),
]


@pytest.mark.parametrize("name, extra, expected", NETWORKS, ids=[n[0] for n in NETWORKS])
def test_network(files, name, extra, expected):
    xml, stable = plan_xml(files, f"name: net\nbackend: libvirt\nkernel: bzImage\n{extra}\n")
    check_golden(f"net-{name}", stable)
    nic = ET.fromstring(xml).find("devices/interface")
    kind, attribute, source = expected
    assert nic.get("type") == kind and nic.find("source").get(attribute) == source
    assert nic.find("model").get("type") == "virtio"
    mac = nic.find("mac").get("address")
    assert mac == ("52:54:00:00:00:2a" if "mac" in extra else default_mac("net"))


def test_default_mac_is_stable_and_unicast():
    assert default_mac("a") == default_mac("a") != default_mac("b")
    assert default_mac("a").startswith("52:54:00:")


@pytest.mark.parametrize("extra, message", [
    ("network: isolated", "net: network mode isolated needs libvirt.network"),
    ("network: {mode: nat, forwards: ['8080:80']}", "net: port forwards need vmctl's own network on a local libvirt"),
])
def test_network_refusals_name_the_machine(files, extra, message):
    with pytest.raises(VmctlError, match=message):
        plan_xml(files, f"name: net\nbackend: libvirt\nkernel: bzImage\n{extra}\n")


@pytest.mark.parametrize("vsock, expected", [("true", {"auto": "yes"}), ("7", {"auto": "no", "address": "7"})])
def test_vsock(files, vsock, expected):
    xml, stable = plan_xml(files, f"name: v\nbackend: libvirt\nkernel: bzImage\nlibvirt: {{vsock: {vsock}}}\n")
    check_golden(f"vsock-{'auto' if vsock == 'true' else vsock}", stable)
    vsock_element = ET.fromstring(xml).find("devices/vsock")
    assert vsock_element.get("model") == "virtio" and vsock_element.find("cid").attrib == expected


def test_tcg_domain_without_seclabel(files):
    xml, stable = plan_xml(files, "name: t\nbackend: libvirt\nkernel: bzImage\nlibvirt: {domain_type: qemu}\n", run_as=None)
    check_golden("tcg", stable)
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu" and root.find("seclabel") is None


def test_disk_boot_refuses_a_command(files):
    with pytest.raises(VmctlError, match="db: `command` needs direct kernel boot"):
        plan_xml(files, "name: db\nbackend: libvirt\ndisks: [base.qcow2]\ncommand: 'true'\n")


def test_values_are_escaped_not_pasted(files):
    xml, _ = plan_xml(files, KERNEL_BOOT.replace("cmdline: console=ttyS0 quiet", "cmdline: \"a<b & c='d'\""))
    assert ET.fromstring(xml).findtext("os/cmdline").startswith("a<b & c='d' ")


def test_target_names_follow_linux():
    assert [target_name(i) for i in (0, 1, 25, 26, 27)] == ["vda", "vdb", "vdz", "vdaa", "vdab"]


def test_local_network_is_vmctls_own_tap_with_the_guest_address_on_the_cmdline(files):
    # What the backend does for a local machine with a network and no libvirt network/bridge:
    # QEMU opens the TAP vmctl made (its /30 and NAT are vmctl's, as for native VMs).
    ip = "ip=172.30.0.6::172.30.0.5:255.255.255.252::eth0:off"
    xml, stable = plan_xml(files, "name: net\nbackend: libvirt\nkernel: bzImage\nnetwork: nat\n",
                           tap="vmctl7", extra_words=(ip, "vmctl.sshkey=c3NoLWVkMjU1MTkgQUFBQQ=="))
    check_golden("net-vmctl-tap", stable)
    root = ET.fromstring(xml)
    nic = root.find("devices/interface")
    assert nic.get("type") == "ethernet" and nic.find("source") is None
    assert nic.find("target").attrib == {"dev": "vmctl7", "managed": "no"}
    assert nic.find("model").get("type") == "virtio" and nic.find("mac").get("address") == default_mac("net")
    words = root.findtext("os/cmdline").split()
    assert ip in words and "vmctl.sshkey=c3NoLWVkMjU1MTkgQUFBQQ==" in words
