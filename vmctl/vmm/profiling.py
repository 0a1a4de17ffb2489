"""Per-thread cProfile of a VMM process, for finding where its time goes (VMCTL_PROFILE).

`VMCTL_PROFILE=DIR` makes `vmctl boot` and the VMM daemon profile every Python thread they
run (vCPUs, device workers, the main thread) and write one pstats file per thread to DIR
when the VM ends: `DIR/PID-THREADNAME.prof`, read with `python -m pstats`. Time spent
blocked shows up as the call it blocked in (KVM_RUN in `ioctl`, the worker's `epoll.poll`),
so the files also say how busy each thread was. Off unless the variable is set; costs
nothing then. Profiling slows Python code ~2x: read shares, not absolute times.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import cProfile

ENV = "VMCTL_PROFILE"
_profiles: dict[str, "cProfile.Profile"] = {}
_lock = threading.Lock()


def _start_in_thread(*_: Any) -> None:
    """The first profile event of a new thread: replace this hook with the thread's own profiler."""
    import cProfile  # only when profiling: every VMM start imports this module

    sys.setprofile(None)
    profile = cProfile.Profile()
    with _lock:
        _profiles[f"{threading.current_thread().name}-{threading.get_ident()}"] = profile
    profile.enable()


def install() -> bool:
    """Profile this thread and every thread started from now on, if VMCTL_PROFILE is set."""
    if not os.environ.get(ENV):
        return False
    threading.setprofile(_start_in_thread)
    _start_in_thread()
    return True


def dump() -> None:
    """Write every thread's profile so far (the VM has ended; a thread still running is cut)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    with _lock:
        profiles = dict(_profiles)
    for name, profile in profiles.items():
        profile.disable()  # only stops it when called from its own thread; the snapshot is what we write
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        profile.dump_stats(os.path.join(folder, f"{os.getpid()}-{safe}.prof"))
