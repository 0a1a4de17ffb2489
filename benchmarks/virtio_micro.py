"""The virtio devices' own cost per request, in process, without a guest: where the time goes.

A driver (vmctl.virtio.driver) lays out queues in a GuestMemory the way Linux does and the
device's worker path (`transport.process_queue`, the same code a kick runs) serves them:

  blk_read_1m    one 1 MiB read: an indirect table of header + 256 scattered 4 KiB pages + status
  blk_write_1m   the same, as a write
  blk_read_4k    one 4 KiB read (header, one page, status in one indirect table)
  blk_read_4k_x32  32 such reads posted before one kick (a QD 32 guest): one batch
  blk_read_1m_x4   4 one-MiB reads before one kick: a batch whose copies run on the pool
  net_tx_1500    one 1514-byte UDP frame to a TAP: vnet header + two fragments (needs root)
  net_rx_1500    one 1514-byte frame from the TAP into a posted MRG_RXBUF buffer (needs root)

Each case is repeated for --seconds and reported as microseconds per request (median of
--rounds); --profile prints the top functions by cumulative time per case. Run on the host:

    python benchmarks/virtio_micro.py [--profile] [--json FILE]

Requests/s here bound what a guest can get at queue depth 1 from vmctl's side alone; the
end-to-end comparison with QEMU is benchmarks/virtio.py.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmctl.memory import GuestMemory  # noqa: E402
from vmctl.virtio import blk, mmio  # noqa: E402
from vmctl.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1  # noqa: E402
from vmctl.virtio.driver import MmioDriver  # noqa: E402
from vmctl.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE  # noqa: E402

MEMORY = 64 << 20
QUEUE = 0x100000  # rings at 1 MiB, tables at 2 MiB, data pages from 8 MiB
TABLES = 0x200000
PAGES = 0x800000
DISK_MIB = 64


class Rig:
    """A transport over `device`, its queues laid out by hand so one request can be reposted
    over and over (the chain is written once; only the available ring moves)."""

    def __init__(self, device, memory: GuestMemory, queue_size: int = 256) -> None:
        self.memory = memory
        self.size = queue_size
        self.transport = mmio.VirtioMmioTransport(device, memory, lambda: None)
        driver = MmioDriver(self.transport)
        status = driver.negotiate(F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX | (device.features & 0xFFFFFFFF))
        assert status & mmio.FEATURES_OK
        self.queues = []
        for index in range(len(device.queue_sizes)):
            base = QUEUE + index * 0x10000
            desc, avail, used = base, base + 16 * queue_size, base + 0x8000
            driver.write(mmio.QUEUE_SEL, index)
            driver.write(mmio.QUEUE_NUM, queue_size)
            for low, value in ((mmio.QUEUE_DESC_LOW, desc), (mmio.QUEUE_DRIVER_LOW, avail), (mmio.QUEUE_DEVICE_LOW, used)):
                driver.write(low, value)
                driver.write(low + 4, 0)
            driver.write(mmio.QUEUE_READY, 1)
            self.queues.append({"desc": desc, "avail": avail, "idx": 0})
        driver.driver_ok()

    def indirect(self, queue: int, head: int, table: int, buffers: list[tuple[int, int, int]]) -> None:
        """Descriptor `head` points at an indirect table of (address, length, write?) buffers."""
        for i, (address, length, write) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (DESC_F_WRITE if write else 0) | (0 if last else DESC_F_NEXT)
            self.memory.write(table + 16 * i, struct.pack("<QIHH", address, length, flags, 0 if last else i + 1))
        q = self.queues[queue]
        self.memory.write(q["desc"] + 16 * head, struct.pack("<QIHH", table, 16 * len(buffers), DESC_F_INDIRECT, 0))

    def post(self, queue: int, head: int) -> None:
        q = self.queues[queue]
        self.memory.write_u16(q["avail"] + 4 + 2 * (q["idx"] % self.size), head)
        q["idx"] = (q["idx"] + 1) & 0xFFFF
        self.memory.write_u16(q["avail"] + 2, q["idx"])

    def close(self) -> None:
        self.transport.close()


def scattered_pages(count: int, start: int = PAGES) -> list[int]:
    """Guest pages as a Linux user buffer gets them: 4 KiB each, not contiguous."""
    return [start + 2 * 4096 * i for i in range(count)]


def blk_case(memory: GuestMemory, disk: Path, kind: int, pages: int) -> tuple[Callable[[], None], Callable[[], None]]:
    rig = Rig(blk.open_block_device(str(disk)), memory)
    header = TABLES - 0x1000
    memory.write(header, struct.pack("<IIQ", kind, 0, 8))
    status = header + 64
    write = kind == blk.T_IN
    buffers = [(header, 16, False), *[(page, 4096, write) for page in scattered_pages(pages)], (status, 1, True)]
    rig.indirect(0, 0, TABLES, buffers)

    def once() -> None:
        rig.post(0, 0)
        rig.transport.process_queue(0)
        assert memory.read(status, 1) == b"\0"

    return once, rig.close


def blk_batch_case(memory: GuestMemory, disk: Path, kind: int, pages: int,
                   batch: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """`batch` requests, each its own table, header, pages and status, posted before one kick."""
    rig = Rig(blk.open_block_device(str(disk)), memory)
    write = kind == blk.T_IN
    statuses = []
    for index in range(batch):
        table = TABLES + index * 0x2000
        header = PAGES - 0x1000 - 64 * index
        memory.write(header, struct.pack("<IIQ", kind, 0, 8 + 2048 * index))
        status = header + 32
        statuses.append(status)
        first_page = PAGES + index * pages * 2 * 4096
        buffers = [(header, 16, False), *[(page, 4096, write) for page in scattered_pages(pages, first_page)],
                   (status, 1, True)]
        rig.indirect(0, index, table, buffers)

    def once() -> None:
        for index in range(batch):
            rig.post(0, index)
        rig.transport.process_queue(0)
        assert all(memory.read(status, 1) == b"\0" for status in statuses)

    return once, rig.close


def net_case(memory: GuestMemory, direction: str) -> tuple[Callable[[], None], Callable[[], None]]:
    from vmctl.net.host import HostNetwork
    from vmctl.virtio.net import F_MRG_RXBUF, NetDevice

    network = HostNetwork("isolated").open()
    device = NetDevice(network.tap, network.mac, on_close=network.close)
    rig = Rig(device, memory)
    assert device._mrg_rxbuf or not device.features & F_MRG_RXBUF
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((network.host_ip, 0))
    sink.setblocking(False)
    # TX: a UDP datagram of 1472 bytes (no GSO: the TAP would need a valid TCP stream) spread
    # over a header descriptor and page fragments the way Linux's skb frags are.
    frame = _udp_frame(network, sink.getsockname()[1], 1472)
    hdr_addr = TABLES - 0x2000
    memory.write(hdr_addr, bytes(12))
    data_addr = PAGES
    memory.write(data_addr, frame)
    rig.indirect(1, 0, TABLES, [(hdr_addr, 12, False), (data_addr, 64, False), (data_addr + 64, len(frame) - 64, False)])

    def tx() -> None:
        rig.post(1, 0)
        rig.transport.process_queue(1)
        try:
            while True:
                sink.recv(65536)
        except BlockingIOError:
            pass

    # RX: the host sends one datagram to the guest; the device reads it from the TAP into a
    # posted 1526-byte buffer (one per packet, as Linux posts with MRG_RXBUF).
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    os.system(f"ip neigh replace {network.guest_ip} lladdr {network.mac} dev {network.tap.name}")
    rx_buffer = PAGES + 0x100000
    rig.memory.write(rig.queues[0]["desc"], struct.pack("<QIHH", rx_buffer, 1526, DESC_F_WRITE, 0))
    payload = bytes(1472)

    def rx() -> None:
        sender.sendto(payload, (network.guest_ip, 9))
        rig.post(0, 0)
        rig.transport.process_queue(0)  # RX kick: the device reads the TAP into the buffer
        assert rig.memory.read_u16(rig.queues[0]["desc"] + 0x8000 + 2) == rig.queues[0]["idx"]

    def close() -> None:
        sink.close()
        sender.close()
        rig.close()

    return (tx if direction == "tx" else rx), close


def _udp_frame(network, port: int, size: int) -> bytes:
    import ipaddress

    def checksum(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data + b"\0" * (len(data) % 2)))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF

    src, dst = ipaddress.ip_address(network.guest_ip).packed, ipaddress.ip_address(network.host_ip).packed
    udp = struct.pack("!HHHH", 4000, port, 8 + size, 0) + bytes(size)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    tap_mac = Path(f"/sys/class/net/{network.tap.name}/address").read_text().strip()
    eth = bytes.fromhex(tap_mac.replace(":", "")) + bytes.fromhex(network.mac.replace(":", "")) + b"\x08\x00"
    return eth + ip + udp


def measure(once: Callable[[], None], seconds: float, rounds: int) -> float:
    once()  # warm up
    results = []
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / rounds:
            for _ in range(16):
                once()
            count += 16
        results.append(elapsed / count * 1e6)
    return round(statistics.median(results), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per case (default 3)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case; the median is reported")
    parser.add_argument("--profile", action="store_true", help="print the top functions of each case")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", help="run only cases whose name contains this")
    args = parser.parse_args(argv)
    memory = GuestMemory([(0, MEMORY)])
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vmctl-virtio-micro-") as temp:
        disk = Path(temp) / "disk.raw"
        disk.write_bytes(os.urandom(1 << 20) * DISK_MIB)
        cases: dict[str, Callable[[], tuple[Callable[[], None], Callable[[], None]]]] = {
            "blk_read_1m": lambda: blk_case(memory, disk, blk.T_IN, 256),
            "blk_write_1m": lambda: blk_case(memory, disk, blk.T_OUT, 256),
            "blk_read_4k": lambda: blk_case(memory, disk, blk.T_IN, 1),
            "blk_read_4k_x32": lambda: blk_batch_case(memory, disk, blk.T_IN, 1, 32),
            "blk_read_1m_x4": lambda: blk_batch_case(memory, disk, blk.T_IN, 256, 4),
        }
        per_request = {"blk_read_4k_x32": 32, "blk_read_1m_x4": 4}  # µs per request, not per batch
        if os.geteuid() == 0 and os.path.exists("/dev/net/tun"):
            cases["net_tx_1500"] = lambda: net_case(memory, "tx")
            cases["net_rx_1500"] = lambda: net_case(memory, "rx")
        for name, make in cases.items():
            if args.only and args.only not in name:
                continue
            once, close = make()
            try:
                results[name] = round(measure(once, args.seconds, args.rounds) / per_request.get(name, 1), 1)
                print(f"{name:14} {results[name]:8.1f} us/request", flush=True)
                if args.profile:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for _ in range(2000 if "1m" not in name else 300):
                        once()
                    profiler.disable()
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
            finally:
                close()
    memory.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
