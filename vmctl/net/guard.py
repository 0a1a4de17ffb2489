"""The NAT rule of a sandboxed VMM, removed when that VMM ends however it ends.

A sandboxed VMM (vmm/sandbox.py) runs as `nobody` under a seccomp filter without exec, so
it can no longer run `iptables -D` at exit. Before it drops its privileges it hands its
rule to this small privileged process: `python -m vmctl.net.guard RULE_JSON`, whose stdin
is a pipe only the VMM holds the write end of. The guard waits for end-of-file (the VMM
exited, crashed or was killed with -9), deletes the rule and exits. The TAP needs no guard:
it is not persistent and goes with the VMM's fd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from ..errors import VmctlError


def start(rule: list[str]) -> subprocess.Popen:
    """A guard for `rule`; the returned process's stdin must stay open in the VMM."""
    return subprocess.Popen([sys.executable, "-m", "vmctl.net.guard", json.dumps(rule)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True)


def main(argv: list[str]) -> int:
    from .host import disable_nat

    if len(argv) != 1:
        print("usage: python -m vmctl.net.guard RULE_JSON  (stdin: the VMM's pipe)", file=sys.stderr)
        return 2
    try:
        rule = json.loads(argv[0])
    except ValueError as error:
        print(f"vmctl.net.guard: rule: {error}", file=sys.stderr)
        return 2
    if not isinstance(rule, list) or not all(isinstance(word, str) for word in rule):
        print("vmctl.net.guard: rule: expected a list of strings", file=sys.stderr)
        return 2
    for number in (signal.SIGINT, signal.SIGHUP):  # the terminal's signals are not the VMM's end
        signal.signal(number, signal.SIG_IGN)
    while os.read(0, 4096):  # the VMM never writes: this returns b"" when it is gone
        pass
    try:
        disable_nat(rule)
    except VmctlError as error:
        print(f"vmctl.net.guard: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
