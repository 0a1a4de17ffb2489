"""Run a command on "a Linux host with hardware KVM": this one, or the nested host."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import VmctlError
from .l1_host import NestedHost, command_environment


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    stdout: str
    stderr: str


@dataclass
class LinuxRunner:
    """mode "direct" runs commands here; "nested" boots one nested host per run()."""

    mode: str
    nested: NestedHost = field(default_factory=NestedHost)

    def run(
        self,
        command: Sequence[str],
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
    ) -> RunResult:
        """Same environment rules either way: vmctl.nested.l1_host.command_environment."""
        if self.mode == "nested":
            result = self.nested.run(command, cwd=cwd, env=env, timeout=timeout)
            return RunResult(result.exit_code, result.stdout, result.stderr)
        if self.mode != "direct":
            raise VmctlError(f"LinuxRunner cannot run commands in mode {self.mode!r}")
        try:
            done = subprocess.run(
                list(command), cwd=cwd or os.getcwd(), env=command_environment(env, nested=False),
                stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False,
            )
        except subprocess.TimeoutExpired:
            raise VmctlError(f"{command[0]} timed out after {timeout:g} s") from None
        return RunResult(
            done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
        )
