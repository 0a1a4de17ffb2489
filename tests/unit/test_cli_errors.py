"""One-line errors from `vmctl run` options, and the console script's exit for a signal
that arrives while the CLI is still being imported (real subprocesses: main() installs
signal handlers, which must not leak into the test process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest


def vmctl(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, VMCTL_STATE_DIR=str(tmp_path))
    return subprocess.run([sys.executable, "-m", "vmctl", *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("option, message", [
    (["--memory", "12"], "--memory 12: below the minimum of 16M"),
    (["--cpus", "0"], "--cpus 0: out of range 1..32"),
    (["--cpus", "99"], "--cpus 99: out of range 1..32"),
])
def test_run_checks_its_size_options_like_the_spec_does(option, message, tmp_path):
    result = vmctl("run", *option, "--", "true", tmp_path=tmp_path)
    assert (result.returncode, result.stderr) == (1, f"vmctl: error: {message}\n")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: signal.Signals(s).name)
def test_a_signal_during_start_up_is_one_line(sig):
    """The entry module handles signals before it imports the CLI; send one right then."""
    code = ("import os, signal, sys, vmctl.entry as e\n"
            "import builtins\n"
            "real = builtins.__import__\n"
            "def slow(name, *a, **k):\n"
            "    if name == 'cli' or name.endswith('.cli'):\n"
            f"        os.kill(os.getpid(), {int(sig)})\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = slow\n"
            "sys.argv = ['vmctl', 'ps']\n"
            "sys.exit(e.main())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (128 + sig, "vmctl: interrupted\n")


def test_rm_tries_every_name_and_fails_if_any_is_unknown(tmp_path):
    result = vmctl("rm", "nope-a", "nope-b", tmp_path=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and "nope-a" in lines[0] and "nope-b" in lines[1], result.stderr
    assert all(line.startswith("vmctl: error: ") for line in lines)
