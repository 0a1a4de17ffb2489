"""What each steady-state suite runs in one ready instance, and the rows it fills.

Servers (iperf3, redis-server) run in the instance; their clients run from the host in the
`client` instance (native: the same binaries from the same tree), so that every column is
measured from the same place with the same client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .columns.base import Instance, check_ok
from .model import SuiteRun
from .tools import fio, iperf3, redis, sysbench

STEADY_SUITES = ("cpu", "memory", "disk", "net", "app")
NEEDS_NETWORK = {"net", "app"}
TOOLS = {"cpu": ("sysbench",), "memory": ("sysbench",), "disk": ("fio",), "net": ("iperf3", "redis-server"),
         "app": ("redis-server", "redis-benchmark")}


@dataclass(frozen=True)
class Params:
    repeats: int  # samples per row
    seconds: int  # per timed tool run
    fio_mib: int
    redis_requests: int
    latency_requests: int
    startup_runs: int

    @staticmethod
    def for_mode(quick: bool, nested: bool = False) -> "Params":
        if quick:
            return Params(repeats=1, seconds=1, fio_mib=32, redis_requests=2000, latency_requests=500, startup_runs=1)
        if nested:  # everything runs under TCG there: shorter runs, the same number of samples
            return Params(repeats=2, seconds=2, fio_mib=64, redis_requests=5000, latency_requests=500,
                          startup_runs=2)
        return Params(repeats=3, seconds=5, fio_mib=256, redis_requests=50000, latency_requests=5000, startup_runs=3)


Progress = Callable[[str], None]


def check_tools(instance: Instance, suites: list[str]) -> None:
    """A one-line error naming the missing tool and the image that has it."""
    from ..errors import VmctlError

    needed = sorted({tool for suite in suites for tool in TOOLS.get(suite, ())})
    if not needed:
        return
    probe = "; ".join(f"command -v {t} >/dev/null || echo {t}" for t in needed)
    missing = instance.run(probe, timeout=120).stdout.split()
    if missing:
        raise VmctlError(f"{instance.name}: {', '.join(missing)} missing in the image "
                         "(use image bench: vmctl image rootfs --profile bench)")


def run_steady(run: SuiteRun, column: str, instance: Instance, client: Instance, suites: list[str],
               params: Params, say: Progress) -> None:
    for suite in suites:
        say(f"{suite}")
        {"cpu": _cpu, "memory": _memory, "disk": _disk, "net": _net, "app": _app}[suite](
            run, column, instance, client, params)


def _cpu(run: SuiteRun, column: str, instance: Instance, client: Instance, p: Params) -> None:
    for _ in range(p.repeats):
        out = check_ok("sysbench cpu", instance.run(sysbench.cpu_command(p.seconds)))
        run.add("cpu_events_per_s", column, sysbench.parse_cpu(out))


def _memory(run: SuiteRun, column: str, instance: Instance, client: Instance, p: Params) -> None:
    for _ in range(p.repeats):
        out = check_ok("sysbench memory", instance.run(sysbench.memory_command(p.seconds, "1M", "seq")))
        run.add("memory_seq_mib_s", column, sysbench.parse_memory(out))
        out = check_ok("sysbench memory", instance.run(sysbench.memory_command(p.seconds, "4K", "rnd")))
        run.add("memory_rnd_mib_s", column, sysbench.parse_memory(out))


FIO_ROWS = (  # row, rw, block, depth, which number
    ("disk_seq_read_mib_s", "read", "1M", 4, "read_mib_s"),
    ("disk_seq_write_mib_s", "write", "1M", 4, "write_mib_s"),
    ("disk_rand_read_qd1_iops", "randread", "4k", 1, "read_iops"),
    ("disk_rand_read_qd32_iops", "randread", "4k", 32, "read_iops"),
    ("disk_rand_write_qd32_iops", "randwrite", "4k", 32, "write_iops"),
)


def _disk(run: SuiteRun, column: str, instance: Instance, client: Instance, p: Params) -> None:
    layout = instance.run(fio.prepare_command(p.fio_mib))
    if layout.exit_code != 0 and "does not support O_DIRECT" in layout.stderr + layout.stdout:
        # tmpfs (the nested host's only writable file system): no number beats a wrong one
        run.notes.append(f"disk: {column}: not measured: its writable layer does not support O_DIRECT")
        instance.run(f"rm -f {fio.TEST_FILE}")
        return
    check_ok("fio layout", layout)
    try:
        for _ in range(p.repeats):
            for row, rw, block, depth, field in FIO_ROWS:
                result = fio.parse(check_ok(f"fio {rw}", instance.run(fio.command(rw, block, depth, p.fio_mib, p.seconds))))
                run.add(row, column, getattr(result, field))
    finally:
        instance.run(f"rm -f {fio.TEST_FILE}")


def _server(instance: Instance, start: str, probe: str) -> None:
    check_ok("server start", instance.run(start))
    for _ in range(100):
        if instance.run(probe).exit_code == 0:
            return
        time.sleep(0.1)
    check_ok("server probe", instance.run(probe))


def _net(run: SuiteRun, column: str, instance: Instance, client: Instance, p: Params) -> None:
    address = _address(instance)
    _server(instance, iperf3.server_command(), f"grep -qi ':{iperf3.PORT:04X} ' /proc/net/tcp /proc/net/tcp6")
    _server(instance, redis.server_command(), redis.ping_command())
    try:
        for _ in range(p.repeats):
            for row, reverse in (("net_tcp_to_instance_mbit_s", False), ("net_tcp_from_instance_mbit_s", True)):
                tcp = client.run(iperf3.client_command(address, p.seconds, reverse), timeout=p.seconds + 60)
                run.add(row, column, iperf3.parse(tcp.stdout))
            out = check_ok("redis-benchmark", client.run(
                redis.benchmark_command(address, "ping", p.latency_requests, 1)))
            result = redis.parse(out)["PING_INLINE"]
            run.add("net_rr_latency_us", column, result.avg_latency_ms * 1000, p99_us=result.p99_latency_ms * 1000)
    finally:
        instance.run(f"redis-cli -p {redis.PORT} shutdown nosave; {iperf3.stop_command()}")


def _app(run: SuiteRun, column: str, instance: Instance, client: Instance, p: Params) -> None:
    address = _address(instance)
    _server(instance, redis.server_command(), redis.ping_command())
    try:
        for _ in range(p.repeats):
            out = check_ok("redis-benchmark", client.run(redis.benchmark_command(address, "get,set", p.redis_requests, 50)))
            results = redis.parse(out)
            run.add("redis_get_rps", column, results["GET"].rps)
            run.add("redis_set_rps", column, results["SET"].rps)
    finally:
        instance.run(f"redis-cli -p {redis.PORT} shutdown nosave; true")


def _address(instance: Instance) -> str:
    from ..errors import VmctlError

    if not instance.address:
        raise VmctlError(f"{instance.name}: has no address the host can reach")
    return instance.address
