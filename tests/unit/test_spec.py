"""The YAML machine spec: values, defaults, and an error for every kind of mistake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmctl.errors import VmctlError
from vmctl.spec import load_spec, parse_spec
from vmctl.spec.model import PortForward
from vmctl.spec.parse import SpecError

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_full_machine(tmp_path):
    (tmp_path / "base.qcow2").write_bytes(b"")
    (tmp_path / "key.pub").write_text("ssh-ed25519 AAAA test")
    spec_path = tmp_path / "vm.yaml"
    spec_path.write_text(
        """
defaults:
  memory: 1GiB
machines:
  web:
    cpus: 2
    disks:
      - image: base.qcow2
        size: 2G
      - {size: 64M}
    network:
      mode: nat
      mac: 52:54:00:AB:CD:EF
      forwards: ["8080:80", "5353:53/udp"]
    ssh: {user: admin, authorized_key: key.pub}
    environment: {GREETING: hello, N: 3}
    command: [uname, -a]
    ephemeral: true
  db:
    memory: 2G
    command: echo hi && true
"""
    )
    spec = load_spec(spec_path)
    web, db = spec.machines
    assert (web.name, web.cpus, web.memory, web.backend) == ("web", 2, 1 << 30, "kvm")
    assert web.disks[0].image == tmp_path / "base.qcow2" and web.disks[0].size == 2 << 30
    assert web.disks[1].image is None and web.disks[1].overlay
    assert web.network.mac == "52:54:00:ab:cd:ef"
    assert web.network.forwards == (PortForward(8080, 80), PortForward(5353, 53, "udp"))
    assert web.ssh.user == "admin" and web.ssh.authorized_key == str(tmp_path / "key.pub")
    assert web.environment == {"GREETING": "hello", "N": "3"}
    assert web.command == ("uname", "-a") and web.ephemeral
    assert db.memory == 2 << 30 and db.command == ("/bin/sh", "-c", "echo hi && true")
    assert spec.machine("db") is db and web.source.endswith("vm.yaml:6")


def test_a_dict_with_one_machine():
    spec = parse_spec({"name": "t1", "cpus": 2, "memory": "512M"})
    assert spec.machines[0].name == "t1" and spec.machines[0].memory == 512 << 20


@pytest.mark.parametrize(
    "text, message",
    [
        ("machines:\n  a:\n    cpu: 2\n", "x.yaml:3:5: machines.a.cpu: unknown key (did you mean 'cpus'?)"),
        ("machines:\n  a:\n    cpus: 0\n", "x.yaml:3:11: machines.a.cpus: 0 is out of range 1..32"),
        ("machines:\n  a:\n    cpus: '2'\n", "machines.a.cpus: expected an integer, got '2'"),
        ("machines:\n  a:\n    memory: 12Q\n", "x.yaml:3:13: machines.a.memory: cannot read size '12Q'"),
        ("machines:\n  a:\n    memory: 4M\n", "machines.a.memory: 4M is below the minimum of 16M"),
        ("machines:\n  a:\n    backend: kvmm\n", "machines.a.backend: unknown backend 'kvmm' (did you mean 'kvm'?)"),
        ("machines:\n  a:\n    kernel: nope/bzImage\n", "x.yaml:3:13: machines.a.kernel: nope/bzImage: no such file"),
        ("machines:\n  a:\n    disks: [{size: 1000}]\n", "machines.a.disks[0].size: must be a multiple of 512 bytes"),
        ("machines:\n  a:\n    disks: [{read_only: true}]\n", "machines.a.disks[0]: give `image`"),
        ("machines:\n  a:\n    network: {mode: bridge}\n", "machines.a.network.mode: unknown mode 'bridge'"),
        ("machines:\n  a:\n    network: {mac: zz}\n", "machines.a.network.mac: 'zz' is not a MAC address"),
        ("machines:\n  a:\n    network: {mode: nat, forwards: [80]}\n", "machines.a.network.forwards[0]: '80' is not HOST:GUEST"),
        ("machines:\n  a:\n    network: {forwards: ['80:80']}\n", "port forwards need a network: set mode to nat"),
        ("machines:\n  a:\n    environment: {1X: y}\n", "machines.a.environment.1X: not a valid environment variable name"),
        ("machines:\n  a:\n    ephemeral: maybe\n", "machines.a.ephemeral: expected true or false, got 'maybe'"),
        ("machines:\n  a:\n    name: b\n", "machines.a.name: the machine's name is its key under `machines`"),
        ("machines:\n  Bad_Name: {}\n", "machines.Bad_Name: machine name 'Bad_Name' must be lowercase"),
        ("machines:\n  a: {}\nmachine: {}\n", "x.yaml:3:1: machine: unknown key (did you mean 'machines'?)"),
        ("machines:\n  a:\n    cpus: 1\n    cpus: 2\n", "machines.a.cpus: key given twice"),
        ("machines: []\n", "machines: expected a mapping of machine name -> settings"),
        ("machines:\n  a: [1]\n", "machines.a: expected a mapping, got a list"),
        ("machines: {a: {cpus: 1}\n", "x.yaml:2:1: invalid YAML"),
        ("", "x.yaml: empty spec"),
        ("machines:\n  a:\n    image: debain\n", "x.yaml:3:12: machines.a.image: unknown image 'debain' (did you mean 'debian'?)"),
        ("machines:\n  a:\n    disks: [{size: 0}]\n", "x.yaml:3:20: machines.a.disks[0].size: must be more than 0 and at most 64T"),
        ("machines:\n  a:\n    disks: [{size: 65T}]\n", "machines.a.disks[0].size: must be more than 0 and at most 64T"),
        ("machines:\n  a:\n    disks: [{size: 1X}]\n", "x.yaml:3:20: machines.a.disks[0].size: cannot read size '1X'"),
        ("machines:\n  a:\n    disks: [gone.qcow2]\n", "x.yaml:3:13: machines.a.disks[0]: gone.qcow2: no such file"),
        ("machines:\n  a:\n    disks: [{image: gone.raw}]\n", "x.yaml:3:21: machines.a.disks[0].image: gone.raw: no such file"),
        ("machines:\n  a:\n    disks: [{size: 1G, rw: true}]\n", "machines.a.disks[0].rw: unknown key (valid keys: image, overlay, read_only, size)"),
        ("machines:\n  a:\n    initrd: boot/initrd.img\n", "x.yaml:3:13: machines.a.initrd: boot/initrd.img: no such file"),
        ("machines:\n  a:\n    ssh: {authorized_key: keys/me.pub}\n", "x.yaml:3:27: machines.a.ssh.authorized_key: keys/me.pub: no such file"),
        ("machines:\n  a:\n    ssh: {user: Root}\n", "x.yaml:3:17: machines.a.ssh.user: 'Root' is not a user name"),
        ("machines:\n  a:\n    ssh: {usr: me}\n", "machines.a.ssh.usr: unknown key (did you mean 'user'?)"),
        ("machines:\n  a:\n    network: {mode: nat, forwards: ['70000:80']}\n", "machines.a.network.forwards[0]: ports must be 1..65535"),
        ("machines:\n  a:\n    network: {mac: '01:00:5e:00:00:01'}\n", "machines.a.network.mac: 01:00:5e:00:00:01 is a multicast address"),
        ("machines:\n  a:\n    network: {mode: nat, forward: []}\n", "machines.a.network.forward: unknown key (did you mean 'forwards'?)"),
        ("machines:\n  a:\n    environment: [A=1]\n", "machines.a.environment: expected a mapping of NAME: value, got a list"),
        ("machines:\n  a:\n    command: {run: x}\n", "machines.a.command: expected a list, got a mapping"),
        ("machines:\n  a:\n    command: [ls, [a]]\n", "machines.a.command[1]: expected a string, got a list"),
        ("machines:\n  a:\n    memory: 2T\n", "machines.a.memory: 2T is more than 1 TiB"),
        ("machines:\n  a:\n    cpus: 33\n", "machines.a.cpus: 33 is out of range 1..32"),
        ("defaults:\n  name: x\nmachines:\n  a: {}\n", "x.yaml:2:3: defaults.name: unknown key"),
        ("defaults:\n  memroy: 1G\nmachines:\n  a: {}\n", "defaults.memroy: unknown key (did you mean 'memory'?)"),
        ("machines:\n  a: {}\n  a: {}\n", "x.yaml:3:3: machines.a: machine name given twice"),
    ],
)
def test_errors_name_file_line_column_and_field(text, message):
    with pytest.raises(SpecError) as error:
        parse_spec(text, source="x.yaml", base_dir=Path("/nonexistent-dir"))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_machine_name_lists_the_known_ones(tmp_path):
    spec = parse_spec("machines:\n  a: {}\n  b: {}\n", source="x.yaml", base_dir=tmp_path)
    with pytest.raises(VmctlError, match=r"no machine named 'c' \(machines: a, b\)"):
        spec.machine("c")


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_parse(example):
    assert load_spec(example).machines


def test_libvirt_settings_per_machine_and_per_file():
    spec = parse_spec(
        "defaults:\n  backend: libvirt\n  libvirt: {uri: 'qemu+ssh://root@host/system', upload: true}\n"
        "machines:\n  a: {}\n  b:\n    libvirt: {domain_type: qemu, bridge: br0, vsock: true}\n  c:\n    libvirt: {vsock: 9, network: lab}\n"
    )
    a, b, c = spec.machines
    assert a.backend == "libvirt" and a.libvirt.uri == "qemu+ssh://root@host/system" and a.libvirt.upload
    assert (b.libvirt.uri, b.libvirt.domain_type, b.libvirt.bridge, b.libvirt.vsock) == ("qemu:///system", "qemu", "br0", 0)
    assert (c.libvirt.vsock, c.libvirt.network) == (9, "lab")
    assert parse_spec({"name": "d"}).machines[0].libvirt.vsock is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("machines:\n  a:\n    libvirt: {url: x}\n", "x.yaml:3:15: machines.a.libvirt.url: unknown key (did you mean 'uri'?)"),
        ("machines:\n  a:\n    libvirt: {uri: host}\n", "machines.a.libvirt.uri: 'host' is not a libvirt URI"),
        ("machines:\n  a:\n    libvirt: {domain_type: xen}\n", "machines.a.libvirt.domain_type: unknown domain type 'xen' (one of kvm, qemu)"),
        ("machines:\n  a:\n    libvirt: {vsock: 2}\n", "machines.a.libvirt.vsock: 2 is not a guest CID"),
        ("machines:\n  a:\n    libvirt: {bridge: 'a b'}\n", "machines.a.libvirt.bridge: 'a b' is not a network interface name"),
        ("machines:\n  a:\n    libvirt: {network: n, bridge: b}\n", "machines.a.libvirt.bridge: give `network` or `bridge`, not both"),
        ("machines:\n  a:\n    libvirt: qemu:///system\n", "machines.a.libvirt: expected a mapping"),
    ],
)
def test_libvirt_settings_errors(text, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(text, source="x.yaml")


def test_image_profile_and_sizes_in_every_unit(tmp_path):
    spec = parse_spec("machines:\n  a:\n    image: debian\n    memory: 1GiB\n    disks: [{size: 512M}, {size: 2G}, {size: '1048576'}]\n",
                      source="x.yaml", base_dir=tmp_path)
    machine = spec.machines[0]
    assert machine.image == "debian" and machine.memory == 1 << 30
    assert [d.size for d in machine.disks] == [512 << 20, 2 << 30, 1 << 20]
    assert parse_spec({"name": "b"}).machines[0].image == "busybox"


def test_an_overlay_may_grow_its_image_but_not_shrink_it(tmp_path):
    from vmctl.disk.qcow2.create import create

    create(str(tmp_path / "base.qcow2"), 64 << 20)
    grown = parse_spec("machines:\n  a:\n    disks: [{image: base.qcow2, size: 128M}]\n", source="x.yaml", base_dir=tmp_path)
    assert grown.machines[0].disks[0].size == 128 << 20
    with pytest.raises(SpecError, match=re.escape(
            "x.yaml:3:39: machines.a.disks[0].size: 33554432 bytes is smaller than the image (67108864 bytes): disks can grow, not shrink")):
        parse_spec("machines:\n  a:\n    disks: [{image: base.qcow2, size: 32M}]\n", source="x.yaml", base_dir=tmp_path)
