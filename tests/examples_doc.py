"""The commands each file in examples/ documents in its comments, and how to run them.

A documented command is a comment line indented by at least two spaces after `#` that
starts with `vmctl `, `curl ` or `echo ` (feeding `vmctl … -i`) (a trailing `  # note` is dropped). The linux tier runs them
in order, exactly as written, from the repository root (tests/linux/inner/test_examples.py,
tests/linux/test_examples_containers.py), so an example can never rot unnoticed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
_COMMAND = re.compile(r"^#\s{2,}((?:vmctl|curl|echo)\s.*?)(?:\s{2,}#\s.*)?$")
# Examples whose machines are containers run on this host; the others are VMs (linux tier).
CONTAINER_EXAMPLES = ("container.yaml",)
CONSOLE_DETACH = b"\x01x"  # Ctrl-A x, what a user types to leave `vmctl console`


def documented_commands(path: Path) -> list[str]:
    return [match.group(1).strip() for line in path.read_text().splitlines() if (match := _COMMAND.match(line))]


def all_examples() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def run_documented(path: Path, state_dir: Path, timeout: float = 900) -> list[tuple[str, subprocess.CompletedProcess]]:
    """Run the example's commands in order with `vmctl` from this interpreter's bin
    folder; each must succeed. `vmctl console` gets Ctrl-A x as its input, everything
    else an empty stdin (`vmctl ssh` then runs a shell that reads EOF and exits)."""
    env = dict(os.environ, VMCTL_STATE_DIR=str(state_dir),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = []
    for command in documented_commands(path):
        stdin = CONSOLE_DETACH if command.startswith("vmctl console") else b""
        result = subprocess.run(["/bin/sh", "-c", command], cwd=ROOT, env=env, input=stdin,
                                capture_output=True, timeout=timeout)
        done.append((command, result))
        assert result.returncode == 0, (
            f"{path.name}: `{command}` exited {result.returncode}\nstdout: {result.stdout.decode(errors='replace')}"
            f"\nstderr: {result.stderr.decode(errors='replace')}{_console_tails(state_dir)}")
    return done


def _console_tails(state_dir: Path, lines: int = 40) -> str:
    """The end of every machine's console and VMM log: what a failed `up` saw."""
    tails = []
    for log in sorted((state_dir / "machines").glob("*/*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"\n--- {log.parent.name}/{log.name} (last {len(text)} lines) ---\n" + "\n".join(text))
    return "".join(tails)


def leftovers(state_dir: Path) -> list[str]:
    machines = state_dir / "machines"
    return sorted(p.name for p in machines.iterdir() if p.name != ".lock") if machines.exists() else []
