"""Port forwards to a free host port (`forwards: ["0:80"]`): what ps/status and the fixture say,
and the detached relay the libvirt backend uses."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest

from vmctl.state import StateStore
from vmctl.testing import guest
from vmctl.vmm.forward import start_relay


def test_port_zero_is_a_free_port_shown_everywhere(assemble, vmctl_cli, tmp_path, monkeypatch):
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing")
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  web:\n    kernel: {assemble('ready.S')}\n    memory: 32M\n"
                    f"    network: {{mode: isolated, forwards: ['0:80', '0:53/udp']}}\n")
    assert vmctl_cli("up", str(spec)).returncode == 0
    try:
        rows = json.loads(vmctl_cli("ps", "--json").stdout)
        forwards = rows[0]["network"]["forwards"]
        (tcp, guest_tcp, _), (udp, guest_udp, proto) = forwards
        assert tcp > 0 and udp > 0 and (guest_tcp, guest_udp, proto) == (80, 53, "udp")
        status = json.loads(vmctl_cli("status", "web").stdout)
        assert status["network"]["forwards"] == forwards
        assert status["agent_transport"] is None  # asked of the running VMM: this tiny guest runs no agent
        assert f"127.0.0.1:{tcp}->80/tcp" in vmctl_cli("ps").stdout
        with socket.create_connection(("127.0.0.1", tcp), timeout=5):
            pass  # vmctl listens there
    finally:
        vmctl_cli("rm", "web")


def test_fixture_tells_the_host_port_and_address(assemble, tmp_path):
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing")
    spec = {"kernel": str(assemble("ready.S")), "memory": "32M", "network": {"mode": "isolated", "forwards": ["0:80"]}}
    store = StateStore(tmp_path / "state")
    with guest(spec, store=store) as first, guest(spec, store=store) as second:
        ports = {first.host_port(80), second.host_port(80)}
        assert len(ports) == 2 and all(port > 0 for port in ports)  # two at once never collide
        assert first.address.startswith("172.30.") and first.address != second.address
        with pytest.raises(KeyError):
            first.host_port(81)


def test_detached_relay_forwards_to_the_target_and_stops_on_sigterm(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        target = server.getsockname()[1]

        def echo() -> None:
            connection, _ = server.accept()
            with connection:
                connection.sendall(connection.recv(100).upper())

        threading.Thread(target=echo, daemon=True).start()
        forwards, pid = start_relay("127.0.0.1", [(0, target, "tcp")], str(tmp_path / "relay.log"))
        try:
            (host_port, guest_port, proto), = forwards
            assert host_port > 0 and guest_port == target and proto == "tcp"
            with socket.create_connection(("127.0.0.1", host_port), timeout=5) as client:
                client.sendall(b"hello")
                assert client.recv(100) == b"HELLO"
        finally:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, 0)
                break
            except ChildProcessError:
                break
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", host_port), timeout=1)
