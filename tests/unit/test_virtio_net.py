"""virtio-net over a real TAP device: frames from the in-test driver reach host sockets, host
datagrams land in the guest's receive buffers, and nothing is left behind on the host."""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess

import pytest

from vmctl.memory import GuestMemory
from vmctl.net import host as hostnet
from vmctl.virtio import mmio
from vmctl.virtio.device import F_VERSION_1
from vmctl.virtio.driver import MmioDriver, QueueDriver
from vmctl.virtio.factories import NetFactory
from vmctl.virtio.net import F_MAC, F_MRG_RXBUF, NetDevice, parse_mac

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and iproute2 (TAP devices)",
)

HDR = 12


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(dst_mac: bytes, src_mac: bytes, src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


class NetRig:
    def __init__(self, features: int) -> None:
        self.memory = GuestMemory([(0, 8 << 20)])
        self.network = hostnet.HostNetwork("isolated").open()
        self.device = NetDevice(self.network.tap, self.network.mac, on_close=self.network.close)
        self.transport = mmio.VirtioMmioTransport(self.device, self.memory, lambda: None)
        self.driver = MmioDriver(self.transport)
        assert self.driver.negotiate(features) & mmio.FEATURES_OK
        self.rx = QueueDriver(self.memory, 0x100000, 64)
        self.tx = QueueDriver(self.memory, 0x300000, 64)
        self.driver.setup_queue(0, self.rx)
        self.driver.setup_queue(1, self.tx)
        self.driver.driver_ok()
        with open(f"/sys/class/net/{self.network.tap.name}/address") as file:
            self.host_mac = parse_mac(file.read().strip())

    def close(self) -> None:
        self.transport.close()
        self.memory.close()


@pytest.fixture(params=[F_VERSION_1 | F_MAC, F_VERSION_1 | F_MAC | F_MRG_RXBUF], ids=["plain", "mrg_rxbuf"])
def rig(request):
    rig = NetRig(request.param)
    yield rig
    rig.close()


def test_config_space_holds_the_mac(rig):
    assert rig.transport.read(mmio.CONFIG, 6) == parse_mac(rig.network.mac)


def test_guest_frame_reaches_a_host_socket(rig):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((rig.network.host_ip, 0))
        port = sock.getsockname()[1]
        frame = udp_frame(rig.host_mac, parse_mac(rig.network.mac), rig.network.guest_ip, rig.network.host_ip,
                          4000, port, b"hello from the guest")
        posted = rig.tx.post([bytes(HDR), frame[:20], frame[20:]], [])  # header + frame in pieces
        rig.transport.process_queue(1)
        assert rig.tx.take_used() == [(posted.head, 0)]
        sock.settimeout(30)
        data, (address, _) = sock.recvfrom(100)
    assert data == b"hello from the guest" and address == rig.network.guest_ip


def test_a_flooded_tx_queue_goes_out_in_one_pass(rig):
    """The guest fills the TX ring, then kicks once: every frame reaches the host, and the
    ring is given back with one pass (all used entries there after one process call)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((rig.network.host_ip, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        port = sock.getsockname()[1]
        heads = []
        for index in range(64):
            frame = udp_frame(rig.host_mac, parse_mac(rig.network.mac), rig.network.guest_ip, rig.network.host_ip,
                              4000, port, b"frame %02d" % index)
            heads.append(rig.tx.post([bytes(HDR) + frame], []).head)  # one descriptor each: 64 fill the ring
        rig.transport.process_queue(1)
        assert sorted(rig.tx.take_used()) == sorted((head, 0) for head in heads)
        sock.settimeout(30)
        received = {sock.recv(100) for _ in range(64)}
    assert received == {b"frame %02d" % index for index in range(64)}


def receive_udp(rig, buffer_size: int, count: int, payload: bytes) -> tuple[bytes, int]:
    """Post `count` RX buffers, have the host send `payload` to the guest; returns the frame
    and how many buffers it took."""
    name = rig.network.tap.name
    subprocess.run(["ip", "neigh", "replace", rig.network.guest_ip, "lladdr", rig.network.mac, "dev", name], check=True)
    posted = {rig.rx.post([], [buffer_size]).head: None for _ in range(count)}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, (rig.network.guest_ip, 5555))
    assert select.select([rig.network.tap.fd], [], [], 30)[0], "no frame on the TAP"
    rig.transport.process_queue(0)
    used = rig.rx.take_used()
    assert used and all(head in posted for head, _ in used)
    parts = []
    for head, length in used:
        address, _, _, _ = struct.unpack("<QIHH", rig.memory.read(rig.rx.desc + 16 * head, 16))
        parts.append(rig.memory.read(address, length))
    data = b"".join(parts)
    num_buffers = struct.unpack_from("<H", data, 10)[0]
    assert num_buffers == len(used)
    return data[HDR:], len(used)


def test_host_datagram_lands_in_guest_buffers(rig):
    frame, buffers = receive_udp(rig, 2048, 4, b"to the guest")
    assert buffers == 1
    assert frame[:6] == parse_mac(rig.network.mac) and frame[12:14] == b"\x08\x00"
    assert frame.endswith(b"to the guest")


def test_mrg_rxbuf_spreads_a_frame_over_small_buffers():
    rig = NetRig(F_VERSION_1 | F_MAC | F_MRG_RXBUF)
    try:
        payload = bytes(range(256)) * 2
        frame, buffers = receive_udp(rig, 256, 8, payload)
        assert frame.endswith(payload) and buffers == 3  # 12 + 554 bytes in 256-byte buffers
    finally:
        rig.close()


def test_mrg_rxbuf_reads_frames_straight_into_held_guest_buffers():
    """With buffers for a whole 64 KiB frame posted, each frame is read into them directly;
    the chains a frame did not fill stay held for the next frame, in order."""
    rig = NetRig(F_VERSION_1 | F_MAC | F_MRG_RXBUF)
    try:
        payload = bytes(range(200)) * 7  # one 1454-byte frame (with headers): 2 buffers of 1100
        first, buffers = receive_udp(rig, 1100, 60, payload)  # 60 x 1100 bytes hold a 64 KiB frame
        assert first.endswith(payload) and buffers == 2
        assert len(rig.device._held) == 58  # noqa: SLF001 (the zero-copy path held the rest)
        posted_heads = [chain.head for chain, _, _ in rig.device._held]  # noqa: SLF001
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"second", (rig.network.guest_ip, 5555))
        assert select.select([rig.network.tap.fd], [], [], 30)[0], "no frame on the TAP"
        rig.device._tap_readable()  # noqa: SLF001 (what the worker calls when the TAP is readable)
        used = rig.rx.take_used()
        assert [head for head, _ in used] == posted_heads[:1]  # no new buffer was posted
        address, _, _, _ = struct.unpack("<QIHH", rig.memory.read(rig.rx.desc + 16 * used[0][0], 16))
        data = rig.memory.read(address, used[0][1])
        assert struct.unpack_from("<H", data, 10)[0] == 1 and data.endswith(b"second")
    finally:
        rig.close()


def test_closing_the_device_removes_the_tap():
    rig = NetRig(F_VERSION_1)
    name = rig.network.tap.name
    assert os.path.exists(f"/sys/class/net/{name}")
    rig.close()
    assert not os.path.exists(f"/sys/class/net/{name}")


@pytest.mark.skipif(shutil.which("iptables") is None, reason="needs iptables for --net nat")
def test_nat_rule_is_removed_on_close_and_swept_after_a_kill():
    factory = NetFactory("nat")
    tag = f"vmctl:{factory.network.tap.name}"
    def rules() -> str:
        return subprocess.run(["iptables", "-t", "nat", "-S", "POSTROUTING"], capture_output=True, text=True).stdout

    assert tag in rules()
    assert factory.cmdline_words() == [f"ip={factory.network.guest_ip}::{factory.network.host_ip}:255.255.255.252::eth0:off"]
    factory.release()
    assert tag not in rules()
    # A VM killed with SIGKILL leaves its rule; its TAP is gone, so the next setup sweeps it.
    subprocess.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "172.30.255.252/30", "-j", "MASQUERADE",
                    "-m", "comment", "--comment", "vmctl:vmctl999"], check=True)
    assert hostnet.sweep_stale_rules() == 1
    assert "vmctl:vmctl999" not in rules()
