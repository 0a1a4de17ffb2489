"""net/guard.py: the privileged process that deletes a sandboxed VMM's NAT rule when the
VMM's end of its pipe closes (however the VMM ended)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from vmctl.net import guard

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iptables") is None,
                                reason="needs root and iptables")


def _rules() -> str:
    return subprocess.run(["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"], capture_output=True,
                          text=True).stdout


def test_the_rule_goes_when_the_pipe_closes_and_not_before():
    tag = f"vmctl:guardtest{os.getpid()}"
    rule = ["POSTROUTING", "-t", "nat", "-s", "192.0.2.0/30", "!", "-o", "lo", "-j", "MASQUERADE",
            "-m", "comment", "--comment", tag]
    subprocess.run(["iptables", "-w", "-A", *rule], check=True)
    process = guard.start(rule)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1)  # still waiting for its VMM
        assert tag in _rules()
        process.stdin.close()  # what the kernel does when the VMM dies, even with -9
        assert process.wait(timeout=30) == 0
        assert tag not in _rules()
    finally:
        if process.poll() is None:
            process.kill()
        subprocess.run(["iptables", "-w", "-D", *rule], capture_output=True)


def test_a_bad_rule_argument_is_one_line():
    done = subprocess.run([guard.sys.executable, "-m", "vmctl.net.guard", "{"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
