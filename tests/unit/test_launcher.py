"""The launcher (vmctl.launcher): a real server process, real forks, commands that need no KVM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmctl.launcher import client
from vmctl.launcher.server import Launcher, LauncherError

VMCTL = shutil.which("vmctl", path=os.path.dirname(sys.executable)) or "vmctl"
FAILING = ["boot", "--kernel", "/nonexistent/bzImage", "--no-input"]


@pytest.fixture
def socket_path(tmp_path):
    folder = tmp_path / "launcher"
    folder.mkdir(mode=0o700)
    return str(folder / "launcher.sock")


@pytest.fixture
def launcher(socket_path):
    process = subprocess.Popen([sys.executable, "-m", "vmctl.launcher", "serve", socket_path, "--idle", "60"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert client.wait_for_server(socket_path, 60), process.communicate(timeout=5)
    yield process
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=30)


def run_vmctl(socket_path: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "VMCTL_LAUNCHER": socket_path}
    env.pop(client.ENV, None)
    return subprocess.run([VMCTL, *argv], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


def test_a_command_runs_in_a_fork_with_the_clients_stdio_and_status(launcher, socket_path):
    read_end, write_end = os.pipe()
    with open(os.devnull, "rb") as null, client.connect(socket_path) as conn:
        pid = client.submit(conn, FAILING, fds=(null.fileno(), write_end, write_end))
        os.close(write_end)
        assert pid is not None and pid != launcher.pid
        code = client.wait(conn, pid)
    with os.fdopen(read_end) as output:
        text = output.read()
    assert code == 1 and "kernel: /nonexistent/bzImage: no such file" in text


def test_the_cli_goes_through_the_launcher_and_keeps_its_output(launcher, socket_path):
    result = run_vmctl(socket_path, FAILING)
    assert result.returncode == 1 and "no such file" in result.stderr
    assert launcher.poll() is None  # the launcher outlives its commands


def test_a_dead_launcher_means_the_command_runs_in_the_client(launcher, socket_path):
    launcher.kill()
    launcher.wait()
    assert Path(socket_path).exists()  # a stale socket nobody listens on
    result = run_vmctl(socket_path, FAILING)
    assert result.returncode == 1 and "no such file" in result.stderr


def test_only_a_private_directory_is_trusted(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    assert not client.trusted_directory(str(folder / "launcher.sock"))
    assert client.connect(str(folder / "launcher.sock")) is None
    with pytest.raises(LauncherError):
        Launcher(str(folder / "launcher.sock")).serve(modules=())


def test_the_launcher_refuses_to_fork_a_threaded_process(socket_path):
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, daemon=True)
    worker.start()
    try:
        with pytest.raises(LauncherError, match="threads"):
            Launcher(socket_path).serve(modules=())
    finally:
        stop.set()
        worker.join()
    assert not Path(socket_path).exists()


def test_an_idle_launcher_exits_and_removes_its_socket(socket_path):
    process = subprocess.Popen([sys.executable, "-m", "vmctl.launcher", "serve", socket_path, "--idle", "1"])
    assert client.wait_for_server(socket_path, 60)
    assert process.wait(timeout=60) == 0
    assert not Path(socket_path).exists() and not Path(socket_path + ".pid").exists()


def test_a_second_launcher_on_the_same_socket_leaves(launcher, socket_path):
    second = subprocess.run([sys.executable, "-m", "vmctl.launcher", "serve", socket_path], timeout=60)
    assert second.returncode == 0 and launcher.poll() is None
    assert run_vmctl(socket_path, FAILING).returncode == 1


def test_sigterm_stops_the_launcher(launcher, socket_path):
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 0
    assert not Path(socket_path).exists()


def test_on_demand_start_serves_the_next_command(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = client.default_socket()
    env = {**os.environ, "VMCTL_LAUNCHER": "1"}
    env.pop(client.ENV, None)
    first = subprocess.run([VMCTL, *FAILING], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert first.returncode == 1  # ran in the client, and started a launcher for the next one
    try:
        assert client.wait_for_server(path, 60)
        second = subprocess.run([VMCTL, *FAILING], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert second.returncode == 1 and "no such file" in second.stderr
    finally:
        pid = int(Path(path + ".pid").read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while Path(path).exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def test_a_launched_command_finds_the_launchers_objects_frozen(tmp_path, socket_path):
    # gc.freeze() before each fork: the child's collections skip what it inherited, so the
    # pages of the preloaded modules stay shared instead of being copied on a full collection.
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "freeze_probe.py").write_text("import gc, sys\n\ndef main():\n"
                                           "    print(gc.get_freeze_count(), gc.isenabled())\n    return 0\n")
    env = {**os.environ, "PYTHONPATH": str(probe)}
    server = subprocess.Popen([sys.executable, "-m", "vmctl.launcher", "serve", socket_path, "--idle", "60"],
                              stdin=subprocess.DEVNULL, env=env)
    try:
        assert client.wait_for_server(socket_path, 60)
        read_end, write_end = os.pipe()
        with open(os.devnull, "rb") as null, client.connect(socket_path) as conn:
            pid = client.submit(conn, [], module="freeze_probe", fds=(null.fileno(), write_end, write_end))
            os.close(write_end)
            assert pid is not None and client.wait(conn, pid) == 0
        with os.fdopen(read_end) as output:
            frozen, enabled = output.read().split()
        assert int(frozen) > 10_000 and enabled == "True"  # the preloaded VMM's objects; collection still on
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sigterm_is_handled_before_the_socket_accepts_anyone(socket_path):
    """A client may connect and send SIGTERM at once: the default action (death, status -15)
    must not be what it meets. Checked where the socket starts listening."""
    probe = f"""
import signal, sys
from vmctl.launcher.server import Launcher

class Probe(Launcher):
    def _listen(self):
        listener = super()._listen()
        print(signal.getsignal(signal.SIGTERM) == self._stop, flush=True)
        sys.exit(0)

Probe({socket_path!r}).serve(modules=())
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "True", result.stderr


@pytest.mark.parametrize("argv, launched", [
    (["exec", "nosuch", "--", "true"], True),
    (["cp", "/etc/hostname", "nosuch:/tmp/"], True),
    (["status", "nosuch"], True),
    (["up", "nosuch.yaml"], False),  # its VMM is forked by the launcher instead
])
def test_short_commands_go_through_the_launcher(launcher, socket_path, tmp_path, argv, launched):
    """exec, cp, status... cost mostly the CLI's start: a launched one answers (here: the
    one-line error for a machine that does not exist) from a fork of the launcher."""
    probe = f"from vmctl.cli import _through_launcher; print('status', _through_launcher({argv!r}))"
    env = {**os.environ, "VMCTL_LAUNCHER": socket_path, "VMCTL_STATE_DIR": str(tmp_path / "state")}
    env.pop(client.ENV, None)
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=60)
    if launched:
        assert "status 1" in result.stdout and "nosuch" in result.stderr, result
    else:
        assert "status None" in result.stdout and not result.stderr, result
