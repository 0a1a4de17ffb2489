"""How a VM run ended, and the exit code `vmctl` returns for it."""

from __future__ import annotations

from dataclasses import dataclass

EXIT_TIMEOUT = 124  # like timeout(1)
EXIT_GUEST_CRASH = 125  # triple fault, KVM internal error, kernel panic


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    reason: str  # one line, for the user
    crashed: bool = False

    @classmethod
    def guest_status(cls, code: int, how: str) -> "Outcome":
        return cls(code, f"guest exited with status {code} ({how})")

    @classmethod
    def crash(cls, reason: str) -> "Outcome":
        return cls(EXIT_GUEST_CRASH, reason, crashed=True)
