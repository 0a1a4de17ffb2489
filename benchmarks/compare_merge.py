#!/usr/bin/env python3
"""Merge later runs of some suites into a `vmctl compare --suite` result, and redraw its report.

A full run takes hours (the nested host's columns most of it); after a fix, only the suites and
columns that failed are measured again, and this puts their results in place of the old ones
(SuiteRun.replace: rows, curves, column status and the notes about them), keeping every other
result as measured. Each rerun is named in the notes and its environment kept in the JSON.

    python benchmarks/compare_merge.py BASE.json RERUN.json[=NOTE] ... [--out BASE.json]
        [--report DIR] [--plots DIR --prefix compare-full-]

A rerun made inside the nested host only (`python -m vmctl.nested -- python -m vmctl compare
... --json F`) has columns marked nested L1, as the nested part of a full run does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmctl.suite import report  # noqa: E402
from vmctl.suite.model import SuiteRun  # noqa: E402


def load(path: Path) -> SuiteRun:
    try:
        return SuiteRun.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"{path}: not a vmctl compare --suite result ({error})") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("reruns", nargs="+", help="RERUN.json, or RERUN.json=NOTE (what the note says about it)")
    parser.add_argument("--out", type=Path, help="write the merged JSON here (default: print the table only)")
    parser.add_argument("--report", type=Path, help="also write table.md, plots and report.html here")
    parser.add_argument("--plots", type=Path, help="copy the PNG/SVG plots here, named PREFIX<name>")
    parser.add_argument("--prefix", default="compare-full-")
    args = parser.parse_args()
    merged = load(args.base)
    for item in args.reruns:
        path, _, note = item.partition("=")
        rerun = load(Path(path))
        columns = ", ".join(c.key for c in rerun.columns)
        merged.replace(rerun, note or f"rerun of {', '.join(rerun.suites)} for {columns} ({Path(path).name})")
    if args.out:
        args.out.write_text(report.to_json(merged) + "\n")
    folder = args.report or (Path(tempfile.mkdtemp(prefix="compare-merge-")) if args.plots else None)
    if folder:
        report.write(merged, folder)
        if args.plots:
            for plot in list(folder.glob("*.png")) + list(folder.glob("*.svg")):
                shutil.copyfile(plot, args.plots / f"{args.prefix}{plot.name}")
        if not args.report:
            shutil.rmtree(folder)
    print(report.markdown(merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
