"""Starting and removing many instances at once, always leaving none behind."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .columns.base import Instance, InstanceSpec, Runner


class Fleet:
    """Every instance the run started and has not removed yet (the cleanup list)."""

    def __init__(self) -> None:
        self._live: list[Instance] = []
        self._lock = threading.Lock()

    def start(self, column: Runner, spec: InstanceSpec, index: int) -> Instance:
        instance = column.start(spec, index)
        with self._lock:
            self._live.append(instance)
        return instance

    def start_many(self, column: Runner, spec: InstanceSpec, count: int, first: int = 0) -> tuple[list[Instance], float]:
        """`count` instances started concurrently; (instances, seconds until the last was ready).
        If any fails, the others are removed and the first error is raised."""
        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=count) as pool:
            futures = [pool.submit(self.start, column, spec, first + i) for i in range(count)]
            errors = [f.exception() for f in futures]
        instances = [f.result() for f, e in zip(futures, errors) if e is None]
        failed = [e for e in errors if e is not None]
        if failed:
            self.remove(instances)
            raise failed[0]
        return instances, time.monotonic() - began

    def remove(self, instances: list[Instance]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(instances))) as pool:
            list(pool.map(self._remove_one, instances))

    def _remove_one(self, instance: Instance) -> None:
        try:
            instance.remove()
        finally:
            with self._lock:
                if instance in self._live:
                    self._live.remove(instance)

    def remove_all(self) -> None:
        with self._lock:
            live = list(self._live)
        for instance in live:  # one by one: this runs on Ctrl-C, keep it simple
            try:
                self._remove_one(instance)
            except Exception:  # noqa: BLE001 - keep removing the others
                pass
