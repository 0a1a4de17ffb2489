"""Where a run happened: CPU, kernel, KVM mode, memory, tool versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .columns.base import Instance

VERSIONS = ("sysbench --version", "fio --version", "iperf3 --version | head -1", "redis-server --version")


def describe(client: Instance | None) -> dict:
    from ..host_probe import check_host

    report = check_host()
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), "unknown")
    mem_kib = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                    if line.startswith("MemTotal:")), 0)
    nested = os.environ.get("VMCTL_NESTED") == "1"
    if nested:
        mode = f"nested ({report.kvm_module}, emulated AMD-V in an L1 under QEMU TCG)"
    elif report.hardware_backed:
        mode = f"hardware ({report.kvm_module})"
    else:
        mode = f"paravirtual ({report.kvm_module}: cannot boot Linux guests)" if report.kvm_module == "kvm_pvm" \
            else report.kvm_module
    env = {"cpu_model": cpu, "cpus": os.cpu_count(), "memory_mib": mem_kib >> 10, "kernel": platform.release(),
           "kvm_mode": mode, "kvm_module": report.kvm_module, "nested": nested,
           "shared_machine": "other jobs may run at the same time: compare ratios, not absolute numbers"}
    if client is not None:
        versions = {}
        for command in VERSIONS:
            out = client.run(command, timeout=60)
            versions[command.split()[0]] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else "missing"
        env["tools"] = versions
    return env


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
