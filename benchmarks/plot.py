#!/usr/bin/env python3
"""Draw the benchmark results as charts for docs/ (SVG + PNG, matplotlib: the `bench` extra).

Reads benchmarks/results/*.json (whatever has been measured) and writes:
- docs/plots/ratios.svg: every "vmctl vs its peer" ratio, normalised so that > 1 means vmctl
  is better (throughput: vmctl/peer; time: peer/vmctl), with the issue targets marked;
- docs/plots/run-phases.svg: where the time of `vmctl run -- true` goes, next to QEMU's.

    python benchmarks/plot.py [--results DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Ratio:
    group: str          # benchmark family, e.g. "qcow2"
    label: str          # what was measured
    value: float        # > 1: vmctl better than the peer
    peer: str
    target: float | None = None


# --- extracting ratios from each result file (their shapes differ by benchmark) -------------

def _qcow2(data: dict) -> list[Ratio]:
    targets = {"4 KiB random read": 0.3, "1 MiB sequential read": 0.7, "1 MiB sequential write": 0.7}
    return [Ratio("qcow2", name, float(row["ratio"]), "qemu-img bench", targets.get(name))
            for name, row in data["results"].items() if row.get("ratio")]


_VIRTIO_LABELS = {
    "guest_seqwrite_1m": ("virtio-blk 1 MiB seq write", 0.8),
    "guest_seqread_1m": ("virtio-blk 1 MiB seq read", 0.8),
    "guest_randread_4k": ("virtio-blk 4 KiB rand read", 0.5),
    "guest_tcp_guest_to_host": ("virtio-net TCP guest→host", 0.5),
    "guest_tcp_host_to_guest": ("virtio-net TCP host→guest", 0.5),
}


def _virtio(data: dict) -> list[Ratio]:
    ours, peer = data["medians"]["vmctl"], data["medians"]["qemu"]
    return [Ratio("virtio", label, ours[key] / peer[key], "QEMU microvm", target)
            for key, (label, target) in _VIRTIO_LABELS.items() if ours.get(key) and peer.get(key)]


def _virtio_vhost(data: dict) -> list[Ratio]:
    # The network rows only: with --vhost both VMMs hand virtio-net to the kernel.
    ours, peer = data["medians"]["vmctl"], data["medians"]["qemu"]
    return [Ratio("virtio", f"{label} (vhost-net, both)", ours[key] / peer[key], "QEMU microvm + vhost", 0.5)
            for key, (label, _) in _VIRTIO_LABELS.items() if "tcp" in key and ours.get(key) and peer.get(key)]


def _run(data: dict) -> list[Ratio]:
    return [Ratio("run", "`vmctl run -- true` total time", data["qemu"]["total"] / data["vmctl"]["total"],
                  "QEMU microvm + qemu-img")]


def _boot(data: dict) -> list[Ratio]:
    # ratio_* are vmctl / QEMU (time, memory): lower is better for vmctl, so invert.
    labels = {"ratio_boot": "boot to userspace", "ratio_rss": "idle VMM RSS", "ratio_pss": "idle VMM PSS"}
    return [Ratio("boot", label, 1.0 / float(data[key]), "QEMU microvm")
            for key, label in labels.items() if data.get(key)]


def _libvirt(data: dict) -> list[Ratio]:
    # ratio[label] is libvirt time / native time: above 1, the native backend is faster.
    return [Ratio("libvirt", f"native vs libvirt: {label}", float(data["ratio"][label]), "libvirt + QEMU")
            for label in ("boot to userspace", "vmctl run -- true") if data["ratio"].get(label)]


EXTRACTORS: dict[str, Callable[[dict], list[Ratio]]] = {
    "qcow2.json": _qcow2,
    "virtio.json": _virtio,
    "virtio_vhost.json": _virtio_vhost,
    "run.json": _run,
    "boot.json": _boot,
    "libvirt.json": _libvirt,
}


def collect(results: Path) -> list[Ratio]:
    ratios: list[Ratio] = []
    for name, extract in EXTRACTORS.items():
        path = results / name
        if not path.exists():
            continue
        try:
            ratios += extract(json.loads(path.read_text()))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
            print(f"plot: skipping {path}: unexpected shape ({error!r})")
    return ratios


# --- drawing (matplotlib: the optional `bench` extra) ------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot: matplotlib is missing: pip install '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text in the SVG
    return plt


def ratio_chart(ratios: list[Ratio]):
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(9, 0.32 * len(ratios) + 1.2))
    ys = list(range(len(ratios)))
    colours = ["#3a7d44" if r.value >= (r.target or 1.0) else "#c8553d" for r in ratios]
    axes.barh(ys, [r.value for r in ratios], color=colours)
    for y, r in zip(ys, ratios):
        axes.text(r.value, y, f" {r.value:.2f}x", va="center", fontsize=8)
        if r.target:
            axes.plot([r.target], [y], marker="D", color="black", markersize=4)
    axes.set_yticks(ys)
    axes.set_yticklabels([f"{r.group}: {r.label}" for r in ratios], fontsize=8)
    axes.invert_yaxis()
    axes.axvline(1.0, color="black", linestyle="--", linewidth=1)
    axes.set_xlabel("vmctl vs peer (> 1: vmctl better; ◆ target)")
    return figure


def phase_chart(run: dict):
    plt = _pyplot()
    phases = [p for p in run["vmctl"] if p != "total"]
    rows = [("vmctl", run["vmctl"]), ("QEMU", run["qemu"])]
    figure, axes = plt.subplots(figsize=(9, 2.2))
    for y, (_name, row) in enumerate(rows):
        left = 0.0
        for i, phase in enumerate(phases):
            width = row.get(phase, 0.0)
            axes.barh(y, width, left=left, color=f"C{i}", label=phase if y == 0 else None)
            left += width
        axes.text(left, y, f" {row['total']:.0f} ms", va="center", fontsize=8)
    axes.set_yticks(range(len(rows)))
    axes.set_yticklabels([name for name, _ in rows])
    axes.invert_yaxis()
    axes.set_xlabel("ms")
    axes.set_title(f"`vmctl run -- true` by phase, median ms ({run.get('environment', '')})", fontsize=9)
    axes.legend(fontsize=7, ncol=len(phases), loc="upper center", bbox_to_anchor=(0.5, -0.35))
    return figure


def write(figure, path: Path) -> None:
    """`path` as SVG and the same figure as PNG beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target in (path, path.with_suffix(".png")):
        figure.savefig(target, bbox_inches="tight", dpi=110)
        print(f"wrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
    _pyplot().close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "plots")
    args = parser.parse_args()
    ratios = collect(args.results)
    if not ratios:
        parser.error(f"no results in {args.results}: run a benchmark first")
    write(ratio_chart(ratios), args.out / "ratios.svg")
    run_file = args.results / "run.json"
    if run_file.exists():
        write(phase_chart(json.loads(run_file.read_text())), args.out / "run-phases.svg")
    print(f"{len(ratios)} ratios; median {median(r.value for r in ratios):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
