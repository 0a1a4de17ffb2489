"""MarkerScan: readiness markers in a console log that grows while we poll it."""

from __future__ import annotations

import pytest

from vmctl.backends.base import MarkerScan

pytestmark = pytest.mark.unit

MARKER = b"VMCTL-READY"
CONSOLE = b"[    0.584352] boot noise\r\n" * 20 + MARKER + b"\r\n\r\nbox:~# "


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 11, 12, 64, len(CONSOLE)])
def test_found_exactly_when_the_marker_is_complete_whatever_the_write_sizes(tmp_path, chunk):
    log = tmp_path / "console.log"
    scan = MarkerScan(log, MARKER)
    assert not scan.found()  # no file yet
    end_of_marker = CONSOLE.index(MARKER) + len(MARKER)
    written = 0
    while written < len(CONSOLE):
        with log.open("ab") as out:
            out.write(CONSOLE[written : written + chunk])
        written = min(written + chunk, len(CONSOLE))
        # Polled between every write, as `vmctl up` does while the guest boots.
        assert scan.found() == (written >= end_of_marker), written
        if written >= end_of_marker:
            break


def test_each_byte_is_read_about_once(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"x" * 100_000)
    scan = MarkerScan(log, MARKER)
    assert not scan.found()
    assert scan._offset == 100_000 and len(scan._tail) == len(MARKER) - 1
