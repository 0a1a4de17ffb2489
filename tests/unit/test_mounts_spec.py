"""`mounts:` in YAML: parsing, one-line errors with file:line, and what each backend makes of it."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from vmctl.errors import VmctlError
from vmctl.spec import parse_spec


def spec_text(tmp_path, mounts: str) -> str:
    return f"machines:\n  vm:\n    mounts:\n{mounts}"


def test_mounts_parse(tmp_path):
    (tmp_path / "src").mkdir()
    text = spec_text(tmp_path, f"      - {{host: {tmp_path / 'src'}, guest: /src}}\n"
                               f"      - {{host: {tmp_path}, guest: /data/, read_only: true}}\n")
    (first, second) = parse_spec(text, source="m.yaml", base_dir=tmp_path).machines[0].mounts
    assert (first.host, first.guest, first.read_only) == (tmp_path / "src", "/src", False)
    assert (second.guest, second.read_only) == ("/data", True)
    assert first.tag != second.tag and len(first.tag) <= 36 and first.tag.startswith("vmctl-")


def test_relative_host_paths_are_relative_to_the_spec(tmp_path):
    (tmp_path / "proj").mkdir()
    machine = parse_spec(spec_text(tmp_path, "      - {host: proj, guest: /p}\n"), source="m.yaml", base_dir=tmp_path).machines[0]
    assert machine.mounts[0].host == tmp_path / "proj"


@pytest.mark.parametrize("entry, message", [
    ("{host: MISSING, guest: /x}", "no such directory"),
    ("{host: FILE, guest: /x}", "not a directory"),
    ("{host: DIR, guest: relative}", "not an absolute path"),
    ("{host: DIR, guest: /a/../etc}", "not an absolute path"),
    ("{host: DIR, guest: /proc}", "system mount"),
    ("{host: DIR}", "missing"),
    ("{host: DIR, guest: /x, mode: ro}", "unknown key"),
    ("{host: STATE, guest: /x}", "overlaps vmctl's state folder"),
    ("{host: DIR, guest: /x, cache: sometimes}", "mounts[0].cache: unknown cache mode 'sometimes' (one of auto, always, never)"),
    ("{host: DIR, guest: /x, cache: 1}", "cache"),
])
def test_bad_mounts_are_one_line_errors_with_a_position(tmp_path, monkeypatch, entry, message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "state").mkdir()
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    entry = (entry.replace("MISSING", str(tmp_path / "missing")).replace("FILE", str(tmp_path / "file"))
             .replace("STATE", str(tmp_path)).replace("DIR", str(tmp_path / "dir")))
    with pytest.raises(VmctlError) as error:
        parse_spec(spec_text(tmp_path, f"      - {entry}\n"), source="m.yaml", base_dir=tmp_path)
    text = str(error.value)
    assert text.startswith("m.yaml:4:") and message in text and "\n" not in text


def test_cache_mode_reaches_the_virtio_fs_server(tmp_path):
    """`cache:` per mount, `auto` by default; the kvm plan carries it to the VMM's server."""
    from vmctl.plans import MountPlan
    from vmctl.virtio.factories import fs

    text = spec_text(tmp_path, f"      - {{host: {tmp_path}, guest: /a}}\n      - {{host: {tmp_path}, guest: /b, cache: always}}\n")
    first, second = parse_spec(text, source="m.yaml", base_dir=tmp_path).machines[0].mounts
    assert (first.cache, second.cache) == ("auto", "always")
    plan = MountPlan(str(second.host), second.guest, second.tag, second.read_only, second.cache)
    assert MountPlan.from_json(plan.to_json(), "plan") == plan
    assert MountPlan.from_json({k: v for k, v in plan.to_json().items() if k != "cache"}, "plan").cache == "auto"
    with pytest.raises(VmctlError, match=r"^plan.cache: unknown cache mode 'x'$"):
        MountPlan.from_json({**plan.to_json(), "cache": "x"}, "plan")
    device = fs(plan.host, plan.tag, plan.read_only, plan.cache).make()
    assert (device.server.cache.mode, device.server.timeout) == ("always", 86400)
    device.close()


def test_the_same_guest_path_twice(tmp_path):
    with pytest.raises(VmctlError, match="mounted twice"):
        parse_spec(spec_text(tmp_path, f"      - {{host: {tmp_path}, guest: /x}}\n      - {{host: {tmp_path}, guest: /x/}}\n"),
                   source="m.yaml", base_dir=tmp_path)


def test_libvirt_renders_9p_filesystems(tmp_path):
    from vmctl.backends.libvirt.domain_xml import DomainPlan, FilesystemPlan, render

    plan = DomainPlan(machine="vm", name="vmctl-vm", uuid="00000000-0000-0000-0000-000000000001",
                      domain_type="kvm", cpus=1, memory=256 << 20, console_log="/tmp/c.log",
                      filesystems=(FilesystemPlan("/srv/src", "vmctl-abc", True), FilesystemPlan("/srv/b", "t2")))
    shares = ET.fromstring(render(plan)).findall("./devices/filesystem")
    assert [(f.get("type"), f.get("accessmode")) for f in shares] == [("mount", "passthrough")] * 2
    assert [(f.find("source").get("dir"), f.find("target").get("dir"), f.find("readonly") is not None)
            for f in shares] == [("/srv/src", "vmctl-abc", True), ("/srv/b", "t2", False)]


def test_container_gets_bind_mounts(tmp_path):
    from vmctl.backends.container.bundle import build_config

    machine = parse_spec({"name": "c", "backend": "container",
                          "mounts": [{"host": str(tmp_path), "guest": "/work", "read_only": True}]}).machines[0]
    mounts = build_config(machine, "/rootfs", "/vmctl/c")["mounts"]
    assert mounts[-1] == {"destination": "/work", "type": "bind", "source": str(tmp_path),
                          "options": ["rbind", "nosuid", "nodev", "ro"]}


def test_port_zero_parses_and_a_taken_port_is_named(tmp_path):
    import socket

    from vmctl.net.ports import check_forwards

    machine = parse_spec("machines:\n  w:\n    network: {mode: nat, forwards: ['0:80', '0:53/udp']}\n").machines[0]
    assert [(f.host_port, f.guest_port, f.protocol) for f in machine.network.forwards] == [(0, 80, "tcp"), (0, 53, "udp")]
    check_forwards("w.yaml:2", machine.network.forwards)  # 0 is always fine
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        taken = parse_spec(f"machines:\n  w:\n    network: {{mode: nat, forwards: ['{port}:80']}}\n").machines[0]
        with pytest.raises(VmctlError) as error:
            check_forwards("w.yaml:2", taken.network.forwards)
    assert str(error.value) == f"w.yaml:2: network.forwards: host port {port}/tcp is taken (0:80 picks a free one)"


def test_forwarder_on_port_zero_reports_the_port_it_got():
    import socket

    from vmctl.vmm.forward import Forwarder

    forwarder = Forwarder(0, "127.0.0.1", 9, "tcp")
    try:
        assert forwarder.port > 0
        with socket.create_connection(("127.0.0.1", forwarder.port), timeout=2):
            pass  # it listens on the port it reports
    finally:
        forwarder.close()
