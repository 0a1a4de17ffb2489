"""Host memory accounting for the many-instance suites."""

from __future__ import annotations

from pathlib import Path

from ..procmem import parse_smaps


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[name] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return values


def pss(pids: list[int]) -> int:
    """Sum of the processes' proportional set sizes, bytes."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


def mapped_pss(pids: list[int], files: list[Path]) -> int:
    """Sum of the PSS of the processes' mappings of these files, bytes (/proc/PID/smaps)."""
    names = {str(f) for f in files}
    total_kib = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps").read_text()
        except OSError:
            continue
        total_kib += sum(m.pss_kib for m in parse_smaps(text) if m.name in names)
    return total_kib * 1024


def drop_caches() -> None:
    """Start the page-cache suite from a cold cache (shared machine: others only lose speed)."""
    import os

    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def slope(x: list[int], y: list[float]) -> float | None:
    """Least-squares slope of y over x: the marginal cost of one more instance."""
    if len(x) < 2 or len(set(x)) < 2:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def resident_bytes(files: list[Path]) -> int:
    """Bytes of these files in the host's page cache (util-linux fincore, mincore(2))."""
    import subprocess

    existing = [str(f) for f in files if f.exists()]
    if not existing:
        return 0
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *existing],
                          capture_output=True, text=True)
    return sum(int(v) for v in done.stdout.split() if v.isdigit())
