"""fio 3 with --output-format=json: bandwidth and IOPS of one job on the root filesystem."""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import ToolOutputError, excerpt

TEST_FILE = "/var/tmp/vmctl-fio.bin"  # in the instance's own writable layer


@dataclass(frozen=True)
class FioResult:
    read_mib_s: float
    write_mib_s: float
    read_iops: float
    write_iops: float
    read_clat_us: float
    write_clat_us: float


def command(rw: str, block: str, depth: int, size_mib: int, seconds: int) -> str:
    """One job, O_DIRECT, libaio (so QD>1 really queues), time-based."""
    return (f"fio --name=vmctl --filename={TEST_FILE} --size={size_mib}M --rw={rw} --bs={block} "
            f"--iodepth={depth} --ioengine=libaio --direct=1 --time_based --runtime={seconds} "
            f"--ramp_time=1 --output-format=json")


def prepare_command(size_mib: int) -> str:
    """Lay the file out once, so that reads do not hit holes and writes do not allocate."""
    return (f"fio --name=layout --filename={TEST_FILE} --size={size_mib}M --rw=write --bs=1M "
            f"--ioengine=psync --direct=1 --output-format=json >/dev/null")


def parse(text: str) -> FioResult:
    start = text.find("{")  # fio may print notes before the JSON
    try:
        job = json.loads(text[start:])["jobs"][0]
        read, write = job["read"], job["write"]
        return FioResult(read["bw"] / 1024, write["bw"] / 1024, read["iops"], write["iops"],
                         read["clat_ns"]["mean"] / 1000, write["clat_ns"]["mean"] / 1000)
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise ToolOutputError(f"fio: unreadable JSON output ({error!r}): {excerpt(text)}") from None
