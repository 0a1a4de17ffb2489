"""The run as JSON, a markdown table (ratios to native, Felter et al. beside), one HTML file."""

from __future__ import annotations

import html
import json
from pathlib import Path

from . import rows as R
from .model import NESTED, SuiteRun
from .ratios import ratio


def to_json(run: SuiteRun) -> str:
    return json.dumps(run.as_dict(), indent=2)


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:#.3g}"  # 3 significant digits, trailing zeros kept: 8.00, 50.0, 0.0349


def _cell(run: SuiteRun, row: str, key: str) -> str:
    column = run.column(key)
    if column is not None and column.status != "ok":
        return "not run"
    found = run.measurement(row, key)
    if found is None:
        return "–"
    text = _number(found.stats.median)
    r = ratio(run, row, key)
    return f"{text} ({r:.2f}x)" if r is not None else text


def column_header(run: SuiteRun, key: str) -> str:
    column = run.column(key)
    assert column is not None
    return f"{column.name} (L1)" if column.place == NESTED else column.name


def markdown(run: SuiteRun) -> str:
    keys = [c.key for c in run.columns]
    lines = ["| suite | row | unit | " + " | ".join(column_header(run, k) for k in keys)
             + " | Felter KVM/native | Felter Docker/native |",
             "|---|---|---|" + "---|" * len(keys) + "---|---|"]
    for row in R.ROWS:
        if row.suite not in run.suites or not any(run.measurement(row.key, k) for k in keys):
            continue
        felter = (f"{row.felter_kvm} ({row.felter_what})" if row.felter_kvm else "", row.felter_docker)
        lines.append(f"| {row.suite} | {row.label} | {row.unit} ({row.better} is better) | "
                     + " | ".join(_cell(run, row.key, k) for k in keys) + f" | {felter[0]} | {felter[1]} |")
    # the pagecache VM variants ("vm@L1+ksm", "vm@L1+dax") have measurements but no column of their own
    extra = sorted({m.column for m in run.measurements} - set(keys))
    for key in extra:
        for m in run.measurements:
            if m.column == key:
                lines.append(f"| {R.row(m.row).suite} | {R.row(m.row).label} | {R.row(m.row).unit} | "
                             f"{key}: {_number(m.stats.median)} |" + " |" * (len(keys) - 1) + " | |")
    lines.append("")
    lines.append("Cells: median of n samples (ratio to the native column of the same place). "
                 "Above 1 is better for throughputs, worse for times, latencies and memory.")
    if any(c.place == NESTED for c in run.columns):
        lines.append("Columns marked (L1) ran inside the nested host (an L1 Linux under QEMU TCG with emulated "
                     "AMD-V), with their own native and container columns: their ratios are taken in L1; their "
                     "absolute numbers are not comparable with the host columns'.")
    for column in run.columns:
        if column.status != "ok":
            lines.append(f"- {column_header(run, column.key)}: not run: {column.why}")
    lines += [f"- {note}" for note in run.notes]
    env = run.environment
    lines.append(f"Host: {env.get('cpu_model')}, {env.get('cpus')} CPUs, {env.get('memory_mib')} MiB, kernel "
                 f"{env.get('kernel')}, KVM {env.get('kvm_mode')}; {env.get('shared_machine', '')}.")
    return "\n".join(lines)


def _html_table(markdown_text: str) -> str:
    out, in_table = [], False
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
        else:
            if in_table:
                out.append("</table>")
                in_table = False
            if line.strip():
                out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:nth-child(2),th:nth-child(2){text-align:left}"
         "figure{display:inline-block;margin:1em}")


def html_report(run: SuiteRun, svgs: dict[str, str]) -> str:
    """One self-contained file: the table and every plot inline as SVG."""
    figures = "\n".join(f"<figure>{svg}<figcaption>{html.escape(name)}</figcaption></figure>"
                        for name, svg in svgs.items())
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vmctl compare</title>"
            f"<style>{STYLE}</style></head><body><h1>VM vs container: vmctl compare --suite "
            f"{html.escape(','.join(run.suites))}{' --quick' if run.quick else ''}</h1>"
            f"{_html_table(markdown(run))}\n<h2>Plots</h2>\n{figures}\n"
            f"<h2>Environment</h2><pre>{html.escape(json.dumps(run.environment, indent=2))}</pre></body></html>")


def write(run: SuiteRun, folder: Path) -> list[Path]:
    """result.json, table.md, plots (PNG + SVG when matplotlib is installed) and report.html."""
    from . import plots

    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "result.json", folder / "table.md"]
    written[0].write_text(to_json(run))
    written[1].write_text(markdown(run) + "\n")
    svgs: dict[str, str] = {}
    if plots.available():
        for name, figure in plots.figures(run).items():
            for suffix in ("png", "svg"):
                path = folder / f"{name}.{suffix}"
                figure.savefig(path, bbox_inches="tight", dpi=110)
                written.append(path)
            svgs[name] = (folder / f"{name}.svg").read_text()
            plots.close(figure)
    else:
        run.notes.append("plots: matplotlib is not installed (pip install '.[bench]')")
    (folder / "report.html").write_text(html_report(run, svgs))
    written.append(folder / "report.html")
    return written
