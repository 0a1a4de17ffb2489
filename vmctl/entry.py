"""The `vmctl` console script. Signals are handled before anything heavy is imported.

Why: importing the CLI takes a moment (more on a busy machine); a Ctrl-C, SIGTERM or
SIGHUP in that moment must end the command with one line, not an import traceback. Only
the C module `_signal` is used here (no `enum`, no `argparse`); `vmctl.cli.main` then
installs the real handlers (vmctl.signals).
"""

import _signal
import sys

_EARLY = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)
_received: list[int] = []


def _early(signum: int, frame: object) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def main() -> int:
    for sig in _EARLY:
        _signal.signal(sig, _early)
    try:
        from .cli import main as cli_main

        # cli_main handles signals itself from its first line; one that lands before that
        # line (or before `vmctl.signals` took over) ends up here.
        return cli_main()
    except KeyboardInterrupt:
        sys.stderr.write("vmctl: interrupted\n")
        return 128 + (_received[-1] if _received else _signal.SIGINT)
