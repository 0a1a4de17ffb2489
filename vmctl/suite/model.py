"""The results of a suite run: plain dataclasses that round-trip through JSON."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

HOST = "host"
NESTED = "nested L1"  # inside the nested host (an L1 Linux under QEMU TCG with emulated AMD-V)


@dataclass(frozen=True)
class Stats:
    n: int
    min: float
    median: float
    max: float

    @staticmethod
    def of(samples: list[float]) -> "Stats":
        if not samples:
            raise ValueError("no samples")
        return Stats(len(samples), min(samples), statistics.median(samples), max(samples))


@dataclass
class Measurement:
    """One row of one column: every sample, in the row's unit."""

    row: str
    column: str
    samples: list[float]
    detail: dict[str, Any] = field(default_factory=dict)  # tool output extras (e.g. p99)

    @property
    def stats(self) -> Stats:
        return Stats.of(self.samples)

    def as_dict(self) -> dict:
        return asdict(self) | {"stats": asdict(self.stats)}


@dataclass
class Column:
    """A way of running an instance, and where it ran. `place` decides which native column
    its ratios are taken against: ratios never mix places."""

    name: str  # native | container | docker | vm | qemu
    place: str = HOST
    label: str = ""  # e.g. "container (runc)"
    status: str = "ok"  # ok | not run
    why: str = ""  # when not run: what is missing and how to get it

    @property
    def key(self) -> str:
        """Unique per run: the same kind may run in two places (native on the host and in L1)."""
        return self.name if self.place == HOST else f"{self.name}@L1"


@dataclass
class Series:
    """A curve of a many-instance suite: y against x for one column (density, page cache)."""

    suite: str
    column: str
    metric: str  # e.g. "memavailable_drop_mib"
    x: list[int]
    y: list[float]


@dataclass
class SuiteRun:
    suites: list[str]
    quick: bool
    environment: dict[str, Any]
    columns: list[Column] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: str = ""  # the first step that failed (the others' results are kept)

    def column(self, key: str) -> Column | None:
        return next((c for c in self.columns if c.key == key), None)

    def measurement(self, row: str, column: str) -> Measurement | None:
        return next((m for m in self.measurements if m.row == row and m.column == column), None)

    def add(self, row: str, column: str, value: float, **detail: Any) -> None:
        """Append a sample to the (row, column) measurement, creating it on first use."""
        found = self.measurement(row, column)
        if found is None:
            found = Measurement(row, column, [])
            self.measurements.append(found)
        found.samples.append(float(value))
        for key, extra in detail.items():
            found.detail.setdefault(key, []).append(extra)

    def merge(self, other: "SuiteRun") -> None:
        """Take another run's columns and results (the nested host's part of this run)."""
        self.columns += other.columns
        self.measurements += other.measurements
        self.series += other.series
        self.notes += other.notes
        self.failed = self.failed or other.failed
        self.environment.setdefault("nested", other.environment)

    def replace(self, rerun: "SuiteRun", note: str) -> None:
        """Take `rerun`'s results in place of this run's for the suites and columns it ran (the
        same suites measured again after a fix); its notes replace the ones about them, and
        `note` says which run that was."""
        from .rows import row

        suites, keys = set(rerun.suites), {c.key for c in rerun.columns}

        def covered(column: str, suite: str) -> bool:  # "vm@L1+ksm after KSM" belongs to vm@L1
            return column.split("+")[0].split(" ")[0] in keys and suite in suites

        self.measurements = [m for m in self.measurements if not covered(m.column, row(m.row).suite)]
        self.measurements += rerun.measurements
        self.series = [s for s in self.series if not covered(s.column, s.suite)] + rerun.series
        for column in rerun.columns:
            mine = self.column(column.key)
            if mine is None:
                self.columns.append(column)
            else:
                mine.label, mine.status, mine.why = column.label, column.status, column.why
        self.notes = [n for n in self.notes if not _note_covered(n, keys, suites)]
        self.notes += [n for n in rerun.notes if n not in self.notes] + [note]
        if self.failed not in self.notes:
            self.failed = rerun.failed
        self.suites = list(dict.fromkeys(self.suites + rerun.suites))
        self.environment.setdefault("reruns", []).append({"note": note, "environment": rerun.environment})

    def as_dict(self) -> dict:
        return {"schema": "vmctl-compare-suite/1", "suites": self.suites, "quick": self.quick,
                "environment": self.environment, "columns": [asdict(c) | {"key": c.key} for c in self.columns],
                "measurements": [m.as_dict() for m in self.measurements],
                "series": [asdict(s) for s in self.series], "notes": self.notes, "failed": self.failed}

    @staticmethod
    def from_dict(data: dict) -> "SuiteRun":
        run = SuiteRun(list(data["suites"]), bool(data["quick"]), dict(data["environment"]))
        run.columns = [Column(c["name"], c["place"], c["label"], c["status"], c["why"]) for c in data["columns"]]
        run.measurements = [Measurement(m["row"], m["column"], list(m["samples"]), dict(m["detail"]))
                            for m in data["measurements"]]
        run.series = [Series(**s) for s in data["series"]]
        run.notes = list(data.get("notes", []))
        run.failed = data.get("failed", "")
        return run


def _note_covered(note: str, keys: set[str], suites: set[str]) -> bool:
    """Whether a note is about one of `keys` in one of `suites`: "cpu,disk · vm@L1: failed: …"
    (a failed step) or "disk: native@L1: not measured: …"."""
    if " · " in note:
        head, rest = note.split(" · ", 1)
        return rest.split(":", 1)[0] in keys and bool(set(head.split(",")) & suites)
    parts = note.split(": ", 2)
    return len(parts) == 3 and parts[0] in suites and parts[1] in keys
