"""Every row the suites measure, with Felter et al.'s published ratios where a row matches.

Felter, Ferreira, Rajamony, Rubio, "An Updated Performance Comparison of Virtual Machines and
Linux Containers" (IBM RC25482, 2014; ISPASS 2015): ratio to native, KVM tuned, Docker.
Their benchmarks differ in detail (LINPACK vs sysbench cpu, STREAM vs sysbench memory,
nuttcp vs iperf3, netperf TCP_RR vs redis PING with one client, fio QD128 vs QD32): the
published ratio is beside ours to compare the shape, not the digits.
"""

from __future__ import annotations

from dataclasses import dataclass

HIGHER, LOWER = "higher", "lower"  # which direction is better


@dataclass(frozen=True)
class Row:
    key: str
    suite: str
    label: str
    unit: str
    better: str
    felter_kvm: str = ""  # their KVM / native ("" when no matching row)
    felter_docker: str = ""
    felter_what: str = ""  # their benchmark for this row


ROWS: tuple[Row, ...] = (
    Row("ready_s", "startup", "start to ready", "s", LOWER),
    Row("exec_true_s", "startup", "run `true` in a ready instance", "s", LOWER),
    Row("cpu_events_per_s", "cpu", "sysbench cpu (primes), 1 thread", "events/s", HIGHER,
        "0.98", "1.00", "LINPACK GFLOPS"),
    Row("memory_seq_mib_s", "memory", "sysbench memory, 1 MiB blocks, write", "MiB/s", HIGHER,
        "0.99", "1.00", "STREAM triad"),
    Row("memory_rnd_mib_s", "memory", "sysbench memory, 4 KiB random, write", "MiB/s", HIGHER,
        "0.99", "0.98", "RandomAccess GUPS"),
    Row("disk_seq_read_mib_s", "disk", "fio sequential read, 1 MiB, O_DIRECT", "MiB/s", HIGHER,
        "0.99", "1.00", "fio sequential read"),
    Row("disk_seq_write_mib_s", "disk", "fio sequential write, 1 MiB, O_DIRECT", "MiB/s", HIGHER,
        "0.99", "1.00", "fio sequential write"),
    Row("disk_rand_read_qd1_iops", "disk", "fio 4 KiB random read, QD1, O_DIRECT", "IOPS", HIGHER),
    Row("disk_rand_read_qd32_iops", "disk", "fio 4 KiB random read, QD32, O_DIRECT", "IOPS", HIGHER,
        "0.55", "1.00", "fio random read QD128"),
    Row("disk_rand_write_qd32_iops", "disk", "fio 4 KiB random write, QD32, O_DIRECT", "IOPS", HIGHER,
        "0.53", "1.00", "fio random write QD128"),
    Row("net_tcp_to_instance_mbit_s", "net", "iperf3 TCP, host -> instance", "Mbit/s", HIGHER,
        "0.99", "1.00 (NAT)", "nuttcp bulk TCP"),
    Row("net_tcp_from_instance_mbit_s", "net", "iperf3 TCP, instance -> host", "Mbit/s", HIGHER,
        "0.99", "1.00 (NAT)", "nuttcp bulk TCP"),
    Row("net_rr_latency_us", "net", "request/response latency (redis PING, 1 client)", "µs", LOWER,
        "1.81x", "–", "netperf TCP_RR"),
    Row("redis_get_rps", "app", "redis GET, 50 clients, from the host", "req/s", HIGHER,
        "~0.8", "~0.97 host net / ~0.68 NAT", "Redis peak GET"),
    Row("redis_set_rps", "app", "redis SET, 50 clients, from the host", "req/s", HIGHER),
    Row("density_ready_s", "density", "all N ready (largest N), started at once", "s", LOWER),
    Row("density_memavailable_per_instance_mib", "density", "host MemAvailable per extra instance", "MiB", LOWER),
    Row("density_pss_per_instance_mib", "density", "PSS per extra instance", "MiB", LOWER),
    Row("density_disk_per_instance_mib", "density", "disk per extra instance", "MiB", LOWER),
    Row("pagecache_host_cache_mib", "pagecache", "host page cache of the shared files after all read (largest N)",
        "MiB", LOWER),
    Row("pagecache_first_reader_mib", "pagecache", "host memory for the first reader of the shared files", "MiB",
        LOWER),
    Row("pagecache_extra_reader_mib", "pagecache", "host memory per extra reader of the same files", "MiB", LOWER),
    Row("pagecache_extra_reader_merged_mib", "pagecache", "… per extra reader after KSM (memory_merge)", "MiB",
        LOWER),
    Row("pagecache_ksm_merged_mib", "pagecache", "merged by KSM (largest N)", "MiB", HIGHER),
)

BY_KEY = {row.key: row for row in ROWS}


def row(key: str) -> Row:
    return BY_KEY[key]


def for_suite(suite: str) -> list[Row]:
    return [r for r in ROWS if r.suite == suite]
