"""vmctl's pure-Python qcow2 against `qemu-img bench` on the same files, in one run.

Chain: base.qcow2 (fully written) <- mid.qcow2 (every 4th cluster) <- top.qcow2 (every 7th),
so reads resolve through a 2-level backing chain. Both sides use the page cache
(qemu-img bench -t writeback), queue depth 1 (our API is synchronous), and the same offsets:
qemu-img bench only steps linearly, so "random" 4 KiB I/O is a stride of an odd multiple of
4 KiB modulo the disk size, which visits every 4 KiB block once in a scattered order.
Write tests start from a fresh overlay on mid.qcow2 each time (cluster allocation + COW);
like qemu-img bench, the clock stops before the final flush/close.

Usage: python benchmarks/qcow2_bench.py [--size-mib 256] [--quick]
Writes benchmarks/results/qcow2.json and docs/benchmarks-qcow2.md, prints the table.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmctl.disk import open_disk  # noqa: E402
from vmctl.disk.qcow2.create import create_overlay  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
STRIDE_BLOCKS = 40503  # odd, so it is coprime with the power-of-two block count


def qemu_bench(path: Path, count: int, size: int, step: int, write: bool,
               depth: int = 1) -> float:
    args = ["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-d", str(depth), "-c", str(count),
            "-s", str(size), "-S", str(step)]
    if write:
        args += ["-w", "--pattern=0x5a"]
    out = subprocess.run(args + [str(path)], capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Run completed in ([\d.]+) seconds", out).group(1))


def ours_bench(path: Path, count: int, size: int, step: int, write: bool) -> float:
    disk = open_disk(str(path), read_only=not write)
    buffer = memoryview(bytearray(b"\x5a" * size))
    disk_size = disk.size
    offset = 0
    start = time.perf_counter()
    if write:
        for _ in range(count):
            disk.write(offset, [buffer])
            offset = (offset + step) % disk_size
        # qemu-img bench stops its clock before closing (= flushing) the image; so do we
    else:
        for _ in range(count):
            disk.readinto(offset, [buffer])
            offset = (offset + step) % disk_size
    elapsed = time.perf_counter() - start
    disk.close()
    return elapsed


def build_chain(work: Path, size: int) -> tuple[Path, Path]:
    raw = work / "base.raw"
    with open(raw, "wb") as file:
        chunk = os.urandom(MiB)
        for _ in range(size // MiB):
            file.write(chunk)
    base, mid, top = work / "base.qcow2", work / "mid.qcow2", work / "top.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(base)], check=True)
    raw.unlink()
    for layer, below, every in ((mid, base, 4), (top, mid, 7)):
        create_overlay(str(below), str(layer))
        with open_disk(str(layer)) as disk:
            data = os.urandom(64 * KiB)
            for cluster in range(0, size // (64 * KiB), every):
                disk.pwrite(cluster * 64 * KiB, data)
    for path in (base, mid, top):
        assert subprocess.run(["qemu-img", "check", "-q", str(path)]).returncode == 0
        path.read_bytes()  # warm the page cache
    return mid, top


def measure(name, work, mid, top, count, size, step, write, repeat) -> dict:
    results = {}
    for tool, fn in (("vmctl", ours_bench), ("qemu-img", qemu_bench)):
        times = []
        for run in range(repeat):
            target = top
            if write:
                target = work / f"w-{tool}-{run}.qcow2"
                create_overlay(str(mid), str(target))
            times.append(fn(target, count, size, step, write))
            if write:
                target.unlink()
        best = min(times)
        results[tool] = {"seconds": best, "ops": count / best,
                         "mb_s": count * size / best / 1e6}
    return results


def overlay_creation(work: Path, base: Path, repeat: int) -> dict:
    samples = {"vmctl (durable, fdatasync)": [], "vmctl (no sync)": [], "qemu-img create": []}
    for n in range(repeat):
        path = work / f"ov{n}.qcow2"
        start = time.perf_counter()
        create_overlay(str(base), str(path))
        samples["vmctl (durable, fdatasync)"].append(time.perf_counter() - start)
        path.unlink()
        start = time.perf_counter()
        create_overlay(str(base), str(path), durable=False)
        samples["vmctl (no sync)"].append(time.perf_counter() - start)
        path.unlink()
        start = time.perf_counter()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F",
                        "qcow2", str(path)], check=True, cwd=work)
        samples["qemu-img create"].append(time.perf_counter() - start)
        path.unlink()
    return {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3}
            for k, v in samples.items()}


def profile_random_read(top: Path, count: int, step: int) -> list[str]:
    profiler = cProfile.Profile()
    profiler.enable()
    ours_bench(top, count, 4 * KiB, step, False)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, _, func), (_, calls, tottime, _, _) in sorted(
            stats.stats.items(), key=lambda item: -item[1][2])[:8]:
        rows.append(f"{Path(filename).name}:{func} calls={calls} self={tottime * 1e6 / count:.2f} us/op")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="fewer operations (smoke run)")
    args = parser.parse_args()
    if shutil.which("qemu-img") is None:
        print("qemu-img not found (apt-get install qemu-utils)", file=sys.stderr)
        return 1
    size = args.size_mib * MiB
    scale = 1 if not args.quick else 8
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", "/var/tmp")) as tmp:
        work = Path(tmp)
        mid, top = build_chain(work, size)
        step4k = 4 * KiB * STRIDE_BLOCKS
        rows = {
            "4 KiB random read": measure("rr", work, mid, top, 40000 // scale, 4 * KiB, step4k,
                                         False, 3),
            "4 KiB random write": measure("rw", work, mid, top, 8000 // scale, 4 * KiB, step4k,
                                          True, 3),
            "1 MiB sequential read": measure("sr", work, mid, top, 2 * size // MiB // scale,
                                             MiB, MiB, False, 3),
            "1 MiB sequential write": measure("sw", work, mid, top, size // MiB // scale, MiB,
                                              MiB, True, 3),
        }
        deep = qemu_bench(top, 40000 // scale, 4 * KiB, step4k, False, depth=64)
        creation = overlay_creation(work, work / "base.qcow2", 50 // scale)
        profile = profile_random_read(top, 20000 // scale, step4k)
    table = ["| test | vmctl | qemu-img bench | ratio (vmctl / qemu) | target |",
             "|---|---|---|---|---|"]
    targets = {"4 KiB random read": 0.3, "1 MiB sequential read": 0.7,
               "1 MiB sequential write": 0.7}
    result_rows = {}
    for name, pair in rows.items():
        ours, theirs = pair["vmctl"], pair["qemu-img"]
        unit, key = ("IOPS", "ops") if "4 KiB" in name else ("MB/s", "mb_s")
        ratio = ours[key] / theirs[key]
        target = targets.get(name)
        verdict = "" if target is None else (f">= {target}x " + ("met" if ratio >= target
                                                                  else "MISSED"))
        table.append(f"| {name} | {ours[key]:,.0f} {unit} | {theirs[key]:,.0f} {unit} | "
                     f"{ratio:.2f}x | {verdict} |")
        result_rows[name] = {"vmctl": ours, "qemu-img": theirs, "ratio": ratio,
                             "unit": unit, "target_ratio": target}
    vm_rr = result_rows["4 KiB random read"]["vmctl"]["ops"]
    deep_iops = (40000 // scale) / deep
    table.append(f"| 4 KiB random read, qemu-img bench -d 64 (for reference) | | "
                 f"{deep_iops:,.0f} IOPS | {vm_rr / deep_iops:.2f}x | |")
    result_rows["4 KiB random read, qemu-img depth 64"] = {"qemu-img": {"ops": deep_iops},
                                                          "ratio": vm_rr / deep_iops}
    for name, numbers in creation.items():
        target = "< 5 ms " + ("met" if numbers["median_ms"] < 5 else "MISSED") \
            if name.startswith("vmctl") else "(includes process start)"
        table.append(f"| overlay creation: {name} | {numbers['median_ms']:.2f} ms median "
                     f"(min {numbers['min_ms']:.2f}) | | | {target} |")
    markdown = "\n".join(table)
    report = {
        "chain": "base.qcow2 (full) <- mid.qcow2 (1/4 clusters) <- top.qcow2 (1/7 clusters)",
        "disk_size_bytes": size, "queue_depth": 1, "cache": "writeback (page cache)",
        "python": sys.version.split()[0],
        "qemu_img": subprocess.run(["qemu-img", "--version"], capture_output=True,
                                   text=True).stdout.splitlines()[0],
        "results": result_rows, "overlay_creation": creation,
        "profile_4k_random_read_top": profile,
    }
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "qcow2.json").write_text(json.dumps(report, indent=2))
    doc = ROOT / "docs" / "benchmarks-qcow2.md"
    doc.write_text(_document(markdown, report))
    print(markdown)
    print("\nprofile (4 KiB random read, self time per op):")
    print("\n".join("  " + line for line in profile))
    return 0


def _document(markdown: str, report: dict) -> str:
    profile = "\n".join(f"    {line}" for line in report["profile_4k_random_read_top"])
    return f"""# qcow2 benchmarks: vmctl (pure Python) vs `qemu-img bench`

Generated by `python benchmarks/qcow2_bench.py` (raw numbers: benchmarks/results/qcow2.json).
Disk: {report['disk_size_bytes'] >> 20} MiB, chain {report['chain']}; page cache, queue depth 1,
identical offsets on both sides; best of 3 runs. {report['qemu_img']}, Python {report['python']}.

{markdown}

"Random" I/O uses qemu-img bench's only pattern, a fixed stride (40503 x 4 KiB modulo the
disk size) that visits every 4 KiB block once in scattered order; writes go to a fresh
overlay, so each first touch of a 64 KiB cluster allocates it and copies the other 60 KiB
from the backing chain (both tools do the same work).

## Where the time goes (cProfile, 4 KiB random read)

{profile}

Per request vmctl pays Python call overhead in layers: BlockBackend.readinto -> range and
buffer checks -> extent lookup -> one os.preadv, and on a miss the same again in each
backing image. Since 2026-12-07 the extent lookup of a cluster read before is one dict
lookup (`Qcow2Image._data_map`: guest cluster -> checked host offset, or unallocated; at most
16 Ki entries; an allocating write, discard, write-zeroes or repair drops the entries it
changes) instead of L1 -> cached L2 table -> entry checks: about 10% of a 4 KiB read's CPU
time, at the edge of what a loaded host resolves (CPU time per read, min of 7-9, four
alternating runs per tree: allocated image 6.4-6.9 -> 5.6-6.3 us with one run at 7.5,
overlay 10.6-11.3 -> 9.9-10.9 us); the rest is the layers above. qemu-img's C path is a few hundred nanoseconds; a Python
request is a few microseconds, which dominates small I/O. Large sequential I/O is bounded by
memory copies and system calls, where the two are close.
"""


if __name__ == "__main__":
    sys.exit(main())
