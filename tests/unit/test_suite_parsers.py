"""Parsers of the benchmark tools' output, on samples recorded from the bench image's tools."""

from pathlib import Path

import pytest

from vmctl.suite.tools import ToolOutputError, fio, iperf3, redis, sysbench

pytestmark = pytest.mark.unit
GOLDEN = Path(__file__).parent / "golden" / "suite"


def sample(name: str) -> str:
    return (GOLDEN / name).read_text()


def test_sysbench_cpu_and_memory():
    assert sysbench.parse_cpu(sample("sysbench-cpu.txt")) == 3620.15
    assert sysbench.parse_memory(sample("sysbench-memory.txt")) == 14650.05


def test_sysbench_errors_name_the_tool():
    with pytest.raises(ToolOutputError, match="sysbench cpu: no 'events per second'.*FATAL: bad option"):
        sysbench.parse_cpu("sysbench 1.0.20\nFATAL: bad option\n")
    with pytest.raises(ToolOutputError, match="sysbench memory"):
        sysbench.parse_memory(sample("sysbench-cpu.txt"))


def test_fio_json():
    result = fio.parse(sample("fio-randread.json"))
    assert result.read_iops > 100 and result.write_iops == 0
    assert result.read_mib_s == pytest.approx(result.read_iops * 4 / 1024, rel=0.05)  # 4 KiB blocks
    assert result.read_clat_us > 0


def test_fio_notes_before_json_are_skipped_and_garbage_is_an_error():
    assert fio.parse("note: both iodepth >= 1 and synchronous I/O engine are selected\n"
                     + sample("fio-randread.json")).read_iops > 0
    with pytest.raises(ToolOutputError, match="fio: unreadable JSON"):
        fio.parse("fio: failed to open /var/tmp/x: No space left on device\n")


def test_iperf3_both_directions():
    forward, reverse = iperf3.parse(sample("iperf3.json")), iperf3.parse(sample("iperf3-reverse.json"))
    assert forward > 100 and reverse > 100  # Mbit/s over loopback


def test_iperf3_error_json_and_non_json():
    with pytest.raises(ToolOutputError, match="iperf3: unable to connect to server"):
        iperf3.parse('{"start": {}, "intervals": [], "end": {}, "error": "unable to connect to server: Connection refused"}')
    with pytest.raises(ToolOutputError, match="iperf3: output is not JSON"):
        iperf3.parse("iperf3: error - unable to connect")


def test_redis_benchmark_csv():
    results = redis.parse(sample("redis.csv"))
    assert set(results) == {"PING_INLINE", "PING_MBULK", "SET", "GET"}
    assert results["GET"].rps == 24691.36 and results["GET"].avg_latency_ms == 0.036
    assert results["PING_INLINE"].p99_latency_ms == 0.095


def test_redis_benchmark_errors():
    with pytest.raises(ToolOutputError, match="no CSV header.*Could not connect"):
        redis.parse("Could not connect to Redis at 10.0.0.2:6379: Connection refused\n")
    with pytest.raises(ToolOutputError, match="bad CSV row"):
        redis.parse('"test","rps","avg_latency_ms"\n"GET","fast","0.1"\n')
