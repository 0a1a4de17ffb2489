#!/usr/bin/env python3
"""Draw the benchmark results as SVG charts for docs/ (no plotting library needed).

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
from xml.etree import ElementTree as ET

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


# --- SVG drawing -----------------------------------------------------------------------------

FONT = "font-family:sans-serif;font-size:12px"
ROW, LABEL_W, BAR_W, PAD = 22, 300, 360, 10


def _svg(width: int, height: int) -> ET.Element:
    return ET.Element("svg", xmlns="http://www.w3.org/2000/svg", width=str(width), height=str(height),
                      viewBox=f"0 0 {width} {height}", style=FONT)


def _text(parent: ET.Element, x: float, y: float, text: str, anchor: str = "start", **attrs: str) -> None:
    ET.SubElement(parent, "text", x=f"{x:.1f}", y=f"{y:.1f}", **{"text-anchor": anchor}, **attrs).text = text


def ratio_chart(ratios: list[Ratio]) -> ET.Element:
    scale_max = max([2.0] + [r.value for r in ratios])
    x_of = lambda value: LABEL_W + BAR_W * min(value, scale_max) / scale_max  # noqa: E731
    height = PAD * 2 + ROW * (len(ratios) + 2)
    svg = _svg(LABEL_W + BAR_W + 80, height)
    _text(svg, PAD, PAD + 12, "vmctl vs peer (> 1: vmctl better; ◆ target)", **{"font-weight": "bold"})
    top = PAD + ROW
    for i, r in enumerate(ratios):
        y = top + i * ROW
        colour = "#3a7d44" if r.value >= (r.target or 1.0) else "#c8553d"
        _text(svg, LABEL_W - 6, y + 14, f"{r.group}: {r.label}", anchor="end")
        ET.SubElement(svg, "rect", x=str(LABEL_W), y=f"{y + 3}", width=f"{x_of(r.value) - LABEL_W:.1f}",
                      height=str(ROW - 6), fill=colour)
        _text(svg, x_of(r.value) + 4, y + 14, f"{r.value:.2f}x")
        if r.target:
            cx = x_of(r.target)
            ET.SubElement(svg, "polygon", fill="black",
                          points=f"{cx},{y + 5} {cx + 4},{y + 11} {cx},{y + 17} {cx - 4},{y + 11}")
    one = x_of(1.0)
    ET.SubElement(svg, "line", x1=f"{one}", x2=f"{one}", y1=str(top), y2=str(top + ROW * len(ratios)),
                  stroke="black", **{"stroke-dasharray": "4 3"})
    _text(svg, one, top + ROW * len(ratios) + 14, "1.0 = parity", anchor="middle")
    return svg


PHASE_COLOURS = ["#8d99ae", "#ef8354", "#2b2d42", "#4f9d69", "#bfc0c0"]


def phase_chart(run: dict) -> ET.Element:
    phases = [p for p in run["vmctl"] if p != "total"]
    rows = [("vmctl", run["vmctl"]), ("QEMU", run["qemu"])]
    longest = max(row["total"] for _, row in rows)
    svg = _svg(LABEL_W + BAR_W + 80, PAD * 2 + ROW * 5)
    _text(svg, PAD, PAD + 12, f"`vmctl run -- true` by phase, median ms ({run.get('environment', '')})",
          **{"font-weight": "bold"})
    for i, (name, row) in enumerate(rows):
        y, x = PAD + ROW * (i + 1), float(LABEL_W)
        _text(svg, LABEL_W - 6, y + 14, name, anchor="end")
        for phase, colour in zip(phases, PHASE_COLOURS):
            width = BAR_W * row.get(phase, 0.0) / longest
            ET.SubElement(svg, "rect", x=f"{x:.1f}", y=str(y + 3), width=f"{width:.1f}", height=str(ROW - 6),
                          fill=colour)
            x += width
        _text(svg, x + 4, y + 14, f"{row['total']:.0f} ms")
    legend_y, x = PAD + ROW * 3 + 8, float(LABEL_W)
    for phase, colour in zip(phases, PHASE_COLOURS):
        ET.SubElement(svg, "rect", x=f"{x:.1f}", y=str(legend_y), width="10", height="10", fill=colour)
        _text(svg, x + 14, legend_y + 10, phase)
        x += 14 + 8 * len(phase) + 12
    return svg


def write(svg: ET.Element, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(svg).write(path, encoding="unicode", xml_declaration=False)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


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
