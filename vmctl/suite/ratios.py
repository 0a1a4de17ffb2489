"""Ratios to native, only within one place (the host, or the nested host's L1)."""

from __future__ import annotations

from .model import SuiteRun


def ratio(run: SuiteRun, row: str, column_key: str) -> float | None:
    """median(column) / median(native of the same place); None when either is missing,
    the native median is 0, or the column is native itself. Always value / native: for a
    time or a latency above 1 is worse, for a throughput below 1 is worse."""
    column = run.column(column_key)
    if column is None or column.name == "native":
        return None
    native = next((c for c in run.columns if c.name == "native" and c.place == column.place), None)
    if native is None:
        return None
    ours, base = run.measurement(row, column.key), run.measurement(row, native.key)
    if ours is None or base is None or base.stats.median == 0:
        return None
    return ours.stats.median / base.stats.median


def comparable(run: SuiteRun, a: str, b: str) -> bool:
    """Two columns' absolute numbers compare only when they ran in the same place."""
    ca, cb = run.column(a), run.column(b)
    return ca is not None and cb is not None and ca.place == cb.place
