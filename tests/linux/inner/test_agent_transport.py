"""The guest agent's transport in real Linux guests: exec and the clone's identity go over
the VMM's virtio-console port (hvc0), and over the UART (ttyS1) when the VMM leaves the port
out (VMCTL_AGENT_CONSOLE=0, as for a kernel without virtio-console)."""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmctl.cli.lifecycle import _agent_transport
from vmctl.machine_files import CONTROL, VMM_LOG
from vmctl.testing import clone, guest, snapshot_of
from vmctl.vmm.control import request


@pytest.fixture(autouse=True)
def state_dir(monkeypatch) -> Iterator[Path]:
    # sockets: a local file system, and a short path (108 bytes at most for a socket)
    path = Path(tempfile.mkdtemp(prefix="agt-", dir="/tmp"))
    monkeypatch.setenv("VMCTL_STATE_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def transport(vm) -> str:
    via_control = request(vm.store.folder(vm.name) / CONTROL, "status")["agent_transport"]
    assert _agent_transport(vm.store.folder(vm.name)) == via_control  # what `vmctl status` shows
    return via_control


def test_exec_goes_over_the_virtio_port_and_a_clone_keeps_it():
    spec = {"name": "agv", "memory": "128M"}
    with guest(spec) as vm:
        code, cmdline, _ = vm.exec("cat /proc/cmdline")
        assert code == 0 and "vmctl.agent=hvc0" in cmdline.split()
        assert transport(vm) == "virtio-console"
        assert "guest agent ready on virtio-console" in (vm.store.folder(vm.name) / VMM_LOG).read_text()
        # a reply of many pages (Linux's hvc sends a page per buffer) arrives whole
        code, out, _ = vm.exec("head -c 1000000 /dev/zero | base64 -w0; echo; echo done >&2")
        assert code == 0 and out == base64.b64encode(bytes(1000000)).decode() + "\n"
    with snapshot_of(spec) as snapshot, clone(snapshot) as copy:
        assert transport(copy) == "virtio-console"
        assert copy.exec("hostname")[1].strip() == copy.name  # the identity went over the port too


def test_exec_falls_back_to_the_uart_without_the_port(monkeypatch):
    monkeypatch.setenv("VMCTL_AGENT_CONSOLE", "0")
    with guest({"name": "agu", "memory": "128M"}) as vm:
        code, cmdline, _ = vm.exec("cat /proc/cmdline; ls /dev")
        assert code == 0 and "vmctl.agent=" not in cmdline and "hvc0" not in cmdline.split()
        assert transport(vm) == "uart"
        assert vm.exec("echo $((6 * 7))")[1] == "42\n"
