"""Drive one fuzz target for SECONDS: random buffers and the target's corpus go through
hypothesis's fuzz_one_input. Findings are saved under tests/fuzz/findings/ and counted.

    python tests/fuzz/run.py TARGET SECONDS      (or: scripts/fuzz TARGET SECONDS)
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from targets import TARGETS, cleanup  # noqa: E402

HERE = Path(__file__).parent


def fuzz(name: str, seconds: float, seed: int | None = None) -> dict:
    target = TARGETS[name]
    rng = random.Random(seed)
    corpus = [p.read_bytes() for p in sorted((HERE / "corpus" / name).glob("*.bin"))]
    end = time.monotonic() + seconds
    quiet = logging.getLogger("vmctl")  # refused requests log a warning each: thousands
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _loop(name, target, rng, corpus, end)
    finally:
        quiet.setLevel(level)


def _loop(name: str, target, rng: random.Random, corpus: list[bytes], end: float) -> dict:
    execs = crashes = 0
    seen: set[str] = set()
    started = time.monotonic()
    while time.monotonic() < end:
        if corpus and rng.random() < 0.3:
            buffer = bytearray(rng.choice(corpus))
            for _ in range(rng.randrange(1, 8)):
                if buffer:
                    buffer[rng.randrange(len(buffer))] = rng.randrange(256)
            buffer = bytes(buffer)
        else:
            buffer = rng.randbytes(rng.randrange(1, 2048))
        execs += 1
        try:
            target.hypothesis.fuzz_one_input(buffer)
        except Exception:
            crashes += 1
            digest = hashlib.sha256(buffer).hexdigest()[:16]
            summary = traceback.format_exc().strip().splitlines()[-1]
            if summary not in seen:
                seen.add(summary)
                findings = HERE / "findings"
                findings.mkdir(exist_ok=True)
                (findings / f"{name}-{digest}.bin").write_bytes(buffer)
                print(f"{name}: finding {digest}: {summary}", flush=True)
    return {"target": name, "seconds": round(time.monotonic() - started), "execs": execs,
            "crashes": crashes, "distinct": len(seen)}


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in list(TARGETS) + ["all"]:
        print(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}|all}} SECONDS", file=sys.stderr)
        return 2
    names = list(TARGETS) if sys.argv[1] == "all" else [sys.argv[1]]
    failed = 0
    try:
        results = [fuzz(name, float(sys.argv[2])) for name in names]
    finally:
        cleanup()
    for result in results:
        print(f"{result['target']:<10} {result['execs']:>8} execs  {result['crashes']} crashes "
              f"({result['distinct']} distinct) in {result['seconds']:.0f} s", flush=True)
        failed += result["crashes"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
