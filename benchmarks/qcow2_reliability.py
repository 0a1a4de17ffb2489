"""Long runs of the qcow2 differential tester (vmctl vs qemu-io) and the crash harness
(kill -9, injected ENOSPC/EIO). Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/qcow2_reliability.py difftest --seconds 600
    python benchmarks/qcow2_reliability.py crash --iterations 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vmctl.disk.qcow2 import crashtest, difftest  # noqa: E402


def run_difftest(args) -> dict:
    end = time.monotonic() + args.seconds
    seeds = failures = 0
    configs: Counter = Counter()
    found = []
    seed = args.first_seed
    while time.monotonic() < end and (not args.iterations or seeds < args.iterations):
        work = tempfile.mkdtemp(prefix="vmctl-difftest-")
        result = difftest.run(seed, work, op_count=args.ops)
        shutil.rmtree(work, ignore_errors=True)
        c = result.config
        configs[(c.cluster_size, c.refcount_bits, c.compat, c.maker, c.backing,
                 c.lazy_refcounts)] += 1
        seeds += 1
        if not result.ok:
            failures += 1
            found.append({"seed": seed, "config": vars(c), "problems": result.problems[:5]})
            print(f"seed {seed}: {c}: {result.problems[:2]}", flush=True)
        seed += 1
    return {"kind": "difftest", "seeds": seeds, "ops_per_seed": args.ops,
            "failures": failures, "distinct_configs": len(configs),
            "cluster_sizes": sorted({k[0] for k in configs}),
            "refcount_bits": sorted({k[1] for k in configs}), "found": found}


def run_crash(args) -> dict:
    faults = ("kill", "ENOSPC", "EIO")
    counts: Counter = Counter()
    failures, found, leaks, flushed = 0, [], 0, 0
    end = time.monotonic() + args.seconds
    for n in range(args.iterations or 10**9):
        if time.monotonic() > end:
            break
        fault = faults[n % 3]
        work = tempfile.mkdtemp(prefix="vmctl-crash-")
        outcome = crashtest.iteration(args.first_seed + n, work, fault)
        shutil.rmtree(work, ignore_errors=True)
        counts[fault] += 1
        leaks += outcome.leaks
        flushed += outcome.flushed
        if outcome.problems:
            failures += 1
            found.append({"seed": outcome.seed, "fault": fault, "problems": outcome.problems})
            print(f"seed {outcome.seed} {fault}: {outcome.problems}", flush=True)
    return {"kind": "crash", "iterations": sum(counts.values()), "by_fault": dict(counts),
            "corrupted": failures, "leaked_clusters_total": leaks,
            "flushed_writes_verified": flushed, "found": found}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("difftest", "crash"))
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--iterations", type=int, default=0, help="stop after N (0: time)")
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--ops", type=int, default=40, help="operations per difftest seed")
    args = parser.parse_args()
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"{tool} is needed (Debian package qemu-utils)", file=sys.stderr)
            return 2
    started = time.time()
    result = run_difftest(args) if args.what == "difftest" else run_crash(args)
    result["seconds"] = round(time.time() - started, 1)
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    out = os.path.join(os.path.dirname(__file__), "results", f"qcow2_{args.what}.json")
    with open(out, "w") as file:
        json.dump(result, file, indent=1)
    for key, value in result.items():
        if key != "found":
            print(f"{key:<26}{value}")
    print(f"(JSON in {out})")
    return 1 if result.get("failures") or result.get("corrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
