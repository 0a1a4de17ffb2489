"""sysbench 1.0: `cpu` (primes up to --cpu-max-prime, events/s) and `memory` (MiB/s)."""

from __future__ import annotations

import re

from . import ToolOutputError, excerpt


def cpu_command(seconds: int) -> str:
    return f"sysbench cpu --threads=1 --time={seconds} run"


def memory_command(seconds: int, block: str, mode: str) -> str:
    # --memory-total-size is a cap; --time decides how long it runs.
    return (f"sysbench memory --threads=1 --time={seconds} --memory-block-size={block} "
            f"--memory-total-size=1000G --memory-access-mode={mode} --memory-oper=write run")


_EVENTS = re.compile(r"events per second:\s*([0-9.]+)")
_MEMORY = re.compile(r"MiB transferred \(([0-9.]+) MiB/sec\)")


def parse_cpu(text: str) -> float:
    """events per second."""
    found = _EVENTS.search(text)
    if not found:
        raise ToolOutputError(f"sysbench cpu: no 'events per second' in its output: {excerpt(text)}")
    return float(found.group(1))


def parse_memory(text: str) -> float:
    """MiB per second."""
    found = _MEMORY.search(text)
    if not found:
        raise ToolOutputError(f"sysbench memory: no 'MiB transferred (... MiB/sec)' in its output: {excerpt(text)}")
    return float(found.group(1))
