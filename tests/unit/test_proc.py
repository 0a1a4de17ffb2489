"""vmctl.proc: the one liveness check, signals, waits and atomic JSON writes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from vmctl.proc import pid_alive, process_state, send_signal, wait_gone, write_json_atomic

pytestmark = pytest.mark.unit


def test_a_process_named_with_a_parenthesis_is_alive(tmp_path: Path):
    # /proc/PID/stat is "PID (COMM) STATE ..."; a COMM of "a) Z b" fooled a split at the
    # first ") " into reading state "Z" (a zombie) for a running process.
    program = tmp_path / "a) Z b"
    shutil.copy(shutil.which("sleep"), program)
    child = subprocess.Popen([str(program), "30"])
    try:
        assert process_state(child.pid) in ("S", "R")
        assert pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()


def test_signal_and_wait_end_a_child_and_reap_it():
    child = subprocess.Popen(["sleep", "30"])
    assert send_signal(child.pid, signal.SIGTERM)
    assert wait_gone(child.pid, 5)
    assert process_state(child.pid) is None  # reaped: no zombie left behind
    assert not send_signal(child.pid, signal.SIGTERM)
    assert not pid_alive(None) and wait_gone(None, 0)  # nothing to wait for


def test_write_json_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "outcome.json"
    write_json_atomic(target, {"exit_code": 1})
    write_json_atomic(target, {"exit_code": 0, "reason": "done"}, indent=2)
    assert json.loads(target.read_text()) == {"exit_code": 0, "reason": "done"}
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text())["exit_code"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["outcome.json"]


def test_allocated_bytes_counts_blocks_and_hard_links_once(tmp_path: Path):
    from vmctl.proc import allocated_bytes

    assert allocated_bytes(tmp_path / "missing") == 0
    data = tmp_path / "d"
    data.mkdir()
    (data / "full").write_bytes(b"x" * 65536)
    with open(data / "sparse", "wb") as handle:
        handle.truncate(64 << 20)  # 64 MiB long, nothing allocated
    empty_dir = allocated_bytes(data) - allocated_bytes(data / "full")
    assert allocated_bytes(data / "full") >= 65536
    (data / "link").hardlink_to(data / "full")
    assert allocated_bytes(data) - allocated_bytes(data / "full") == empty_dir  # the link adds nothing
    assert allocated_bytes(data) < 1 << 20  # the sparse file counts what it holds


def test_wait_gone_returns_when_the_process_ends_and_gives_up_at_the_timeout():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not wait_gone(child.pid, 0.2)  # still running: the timeout ends the wait
        assert pid_alive(child.pid)
        killer = subprocess.Popen(["sh", "-c", f"sleep 0.3; kill {child.pid}"])
        assert wait_gone(child.pid, 30)  # woken by the exit (pidfd), reaped
        assert process_state(child.pid) is None
        killer.wait()
    finally:
        child.kill()
        child.wait()
