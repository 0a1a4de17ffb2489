"""A launcher of one's own for a while (benchmarks, tests): started in a private folder,
stopped and removed on close."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .client import SETTING, wait_for_server


class PrivateLauncher:
    def __init__(self, idle: float = 3600, timeout: float = 300) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="vmctl-launcher-"))  # mode 0700
        self.socket = str(self.folder / "launcher.sock")
        self.process = subprocess.Popen([sys.executable, "-m", "vmctl.launcher", "serve", self.socket,
                                         "--idle", str(idle)], stdin=subprocess.DEVNULL)
        if not wait_for_server(self.socket, timeout):
            self.close()
            raise RuntimeError(f"the vmctl launcher did not answer within {timeout:g} s")

    @property
    def pid(self) -> int:
        return self.process.pid

    def env(self) -> dict[str, str]:
        """The environment of a command that should use this launcher."""
        return {**os.environ, SETTING: self.socket}

    def children(self) -> list[int]:
        """The processes the launcher forked that are still running."""
        pid = self.process.pid
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PrivateLauncher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
