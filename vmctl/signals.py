"""SIGINT, SIGTERM and SIGHUP end a `vmctl` command the same way: as an exception.

Why: `vmctl run` promises that the throwaway guest is removed "whatever happens", and every
command undoes what it half-made. Those clean-ups are `finally`/`except BaseException`
blocks, which Python runs for Ctrl-C (KeyboardInterrupt) but not for the default action of
SIGTERM (`timeout`, `kill`, systemd) or SIGHUP (a closed terminal): those kill the process
on the spot. `install()` makes all three raise `Interrupted`; the CLI turns it into one line
and exit status 128+signal. `deferred()` holds signals off while a clean-up runs, so a
second Ctrl-C cannot cut it short; they are raised once it is done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A handled signal arrived; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


# Signals received, in order. Python may run a handler inside a weakref callback or a
# __del__, where the exception it raises is printed as "Exception ignored" and dropped;
# `check()` in the command's wait loops raises it again so the signal is never lost.
_received: list[int] = []


def _raise(signum: int, frame: object) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def check() -> None:
    """Raise Interrupted if a handled signal arrived (call it in wait loops)."""
    if _received:
        raise Interrupted(_received[0])


def install() -> None:
    """From now on SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread."""
    for sig in HANDLED:
        signal.signal(sig, _raise)


def exit_status(error: KeyboardInterrupt) -> int:
    """128 + the signal for Interrupted; 130 (SIGINT) for a plain KeyboardInterrupt."""
    return error.exit_status if isinstance(error, Interrupted) else 128 + signal.SIGINT


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Run the block with the handled signals held; raise the first one afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()  # being handled: the clean-up must not be cut short by check()
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        _received.extend(pending)
        raise Interrupted(pending[0])
