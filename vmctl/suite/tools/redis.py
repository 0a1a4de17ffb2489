"""redis-server in the instance, redis-benchmark --csv from the host."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from . import ToolOutputError, excerpt

PORT = 6379


@dataclass(frozen=True)
class RedisResult:
    test: str
    rps: float
    avg_latency_ms: float
    p99_latency_ms: float


def server_command() -> str:
    # No persistence (the benchmark measures requests, not fsync), reachable from the host.
    return (f"redis-server --port {PORT} --bind 0.0.0.0 --protected-mode no --save '' --appendonly no "
            f"--daemonize yes --logfile /var/tmp/redis.log")


def ping_command() -> str:
    return f"redis-cli -p {PORT} ping"


def benchmark_command(address: str, tests: str, requests: int, clients: int) -> str:
    return f"redis-benchmark -h {address} -p {PORT} -t {tests} -n {requests} -c {clients} --csv"


def parse(text: str) -> dict[str, RedisResult]:
    """By test name (PING_INLINE, GET, SET, ...)."""
    rows = list(csv.reader(io.StringIO(text.strip())))
    if not rows or rows[0][:2] != ["test", "rps"]:
        raise ToolOutputError(f"redis-benchmark: no CSV header in its output: {excerpt(text)}")
    header = rows[0]
    found: dict[str, RedisResult] = {}
    for values in rows[1:]:
        if len(values) != len(header):
            continue
        fields = dict(zip(header, values))
        try:
            found[fields["test"]] = RedisResult(fields["test"], float(fields["rps"]), float(fields["avg_latency_ms"]),
                                                float(fields.get("p99_latency_ms", "nan")))
        except (KeyError, ValueError):
            raise ToolOutputError(f"redis-benchmark: bad CSV row {values!r}") from None
    if not found:
        raise ToolOutputError(f"redis-benchmark: no results in its output: {excerpt(text)}")
    return found
