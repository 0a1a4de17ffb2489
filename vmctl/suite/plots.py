"""matplotlib figures of a run (the optional `bench` extra): ratios, density, page cache."""

from __future__ import annotations

from typing import Any

from . import rows as R
from .model import SuiteRun
from .ratios import ratio


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text in the SVG
    return plt


def close(figure: Any) -> None:
    _pyplot().close(figure)


def ratio_figure(run: SuiteRun) -> Any | None:
    """Grouped horizontal bars: every row's ratio to native, one bar per non-native column."""
    plt = _pyplot()
    rows = [r for r in R.ROWS if r.suite in ("startup", "cpu", "memory", "disk", "net", "app")]
    keys = [c.key for c in run.columns if c.name != "native" and c.status == "ok"]
    data = [(r, [ratio(run, r.key, k) for k in keys]) for r in rows]
    data = [(r, values) for r, values in data if any(v is not None for v in values)]
    if not data or not keys:
        return None
    height = 0.8 / len(keys)
    figure, axes = plt.subplots(figsize=(9, 0.45 * len(data) * max(1, len(keys) / 2) + 1.5))
    for j, key in enumerate(keys):
        ys = [i + j * height for i in range(len(data))]
        axes.barh(ys, [v[j] or 0 for _, v in data], height=height, label=key)
    axes.set_yticks([i + 0.4 - height / 2 for i in range(len(data))])
    axes.set_yticklabels([f"{r.label} ({r.better} better)" for r, _ in data], fontsize=8)
    axes.axvline(1.0, color="black", linestyle="--", linewidth=1)
    axes.set_xscale("log")
    axes.set_xlabel("ratio to native of the same place (log)")
    axes.invert_yaxis()
    axes.legend(fontsize=8)
    axes.set_title("VM and container vs native")
    return figure


def series_figure(run: SuiteRun, suite: str, metrics: list[tuple[str, str]]) -> Any | None:
    plt = _pyplot()
    series = [s for s in run.series if s.suite == suite]
    if not series:
        return None
    figure, axes_list = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for axes, (metric, title) in zip(axes_list[0], metrics):
        for s in series:
            if s.metric == metric:
                axes.plot(s.x, s.y, marker="o", label=s.column)
        axes.set_xlabel("instances")
        axes.set_title(title, fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return figure


def figures(run: SuiteRun) -> dict[str, Any]:
    made = {
        "ratios": ratio_figure(run),
        "density": series_figure(run, "density", [("memavailable_drop_mib", "host MemAvailable drop (MiB)"),
                                                  ("pss_mib", "sum of PSS (MiB)"), ("ready_s", "all ready (s)")]),
        "pagecache": series_figure(run, "pagecache", [("read_cost_mib", "host memory for reading the shared files (MiB)")]),
    }
    return {name: figure for name, figure in made.items() if figure is not None}
