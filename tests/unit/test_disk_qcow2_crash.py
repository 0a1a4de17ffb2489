"""Crash consistency: replay the file writes of a workload up to every fdatasync, plus any
subset of the writes issued after it (what a power cut may leave), and check each state.

A state may leak clusters but must never have a corruption (a table pointing at a cluster
whose refcount or content is not there), and everything flushed before must read back.
"""

from __future__ import annotations

import random

from vmctl.disk.qcow2 import Qcow2Image
from vmctl.disk.qcow2.check import check
from vmctl.disk.qcow2.create import CreateOptions, create, create_overlay

MiB = 1 << 20


class RecordingImage(Qcow2Image):
    """Records every write to the image file and every fdatasync, in order."""

    def __init__(self, *args, log: list, **kwargs) -> None:
        self.log = log
        super().__init__(*args, **kwargs)

    def _pwritev(self, offset, views):
        self.log.append(("write", offset, b"".join(bytes(v) for v in views)))
        super()._pwritev(offset, views)

    def sync(self):
        self.log.append(("sync",))
        super().sync()


def apply(image: bytearray, offset: int, data: bytes) -> None:
    if len(image) < offset + len(data):
        image.extend(bytes(offset + len(data) - len(image)))
    image[offset:offset + len(data)] = data


def test_every_crash_point_is_consistent(tmp_path):
    base = tmp_path / "base.qcow2"
    create(str(base), 4 * MiB, CreateOptions(4096))
    path = tmp_path / "top.qcow2"
    create_overlay(str(base), str(path), options=CreateOptions(4096))
    initial = path.read_bytes()
    log: list = []
    rng = random.Random(3)
    model = bytearray(4 * MiB)
    image = RecordingImage(str(path), read_only=False, log=log, l2_cache_bytes=4 * 4096)
    for step in range(60):
        offset = rng.randrange(0, 4 * MiB - 10000)
        data = rng.randbytes(rng.randrange(1, 10000))
        image.pwrite(offset, data)
        model[offset:offset + len(data)] = data
        if step % 7 == 3:
            start = rng.randrange(0, 4 * MiB // 4096) * 4096
            image.discard(start, 8192)
            model[start:start + 8192] = bytes(8192)
        if step % 10 == 9:
            image.flush()
            log.append(("flushed", bytes(model)))
    image.close()

    epochs: list[list[tuple[int, bytes]]] = [[]]
    flushed_at: dict[int, bytes] = {}  # epoch that starts right after a guest flush
    for entry in log:
        if entry[0] == "write":
            epochs[-1].append((entry[1], entry[2]))
        elif entry[0] == "sync":
            epochs.append([])
        else:
            flushed_at[len(epochs) - 1] = entry[1]
    crash = tmp_path / "crash.qcow2"
    states = 0
    durable = bytearray(initial)
    for index, writes in enumerate(epochs):
        # a crash after this sync: everything before is durable, any subset of these is not
        subsets = [[], writes] + [[w] for w in writes[:3]] + \
            [rng.sample(writes, len(writes) // 2) for _ in range(2) if len(writes) > 1]
        for subset in subsets:
            state = bytearray(durable)
            for offset, data in subset:
                apply(state, offset, data)
            crash.write_bytes(bytes(state))
            report = check(str(crash))
            assert report.corruptions == 0, (index, report.messages[:5])
            expected = flushed_at.get(index)
            if expected is not None and not subset:
                with Qcow2Image(str(crash)) as disk:
                    assert disk.read(0, 4 * MiB) == expected
            states += 1
        for offset, data in writes:
            apply(durable, offset, data)
    assert states > 50 and len(flushed_at) == 6
    assert check(str(path)).clean
