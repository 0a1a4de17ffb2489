"""One module per benchmark tool: the shell line that runs it (quick or full) and the parser
of what it prints. Parsers raise ToolOutputError naming the tool and what was missing."""

from __future__ import annotations

from ...errors import VmctlError


class ToolOutputError(VmctlError):
    """A tool printed something its parser does not understand (or failed)."""


def excerpt(text: str, width: int = 160) -> str:
    """The last non-empty line of `text`, cut to `width`: enough for a one-line error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:width]
