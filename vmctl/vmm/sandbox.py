"""A sandbox for a running VMM (Firecracker's jailer and seccomp filters, in small): once the
VMM holds every fd it needs (/dev/kvm, the VM and vCPU fds, disks, TAP, sockets), it may
drop to an unprivileged user, set no_new_privs and install a seccomp filter that kills the
whole process on any system call outside an allow-list.

The allow-list is what the VMM was measured to use after start-up (strace of tiny guests
and the daemon's requests), grouped below. exec, ptrace, mount, module loading, kexec, bpf,
perf, keyrings, namespaces and privilege changes are absent, so a guest that took over the
VMM's Python could still only do what the VMM already does with its open fds.

Optional dependency: libseccomp through `pyseccomp` (the `sandbox` extra).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

ALLOWED_SYSCALLS: dict[str, tuple[str, ...]] = {
    "memory": ("mmap", "munmap", "mprotect", "madvise", "mremap", "brk"),
    "threads": ("clone", "clone3", "futex", "set_robust_list", "rseq", "exit", "exit_group",
                "gettid", "getpid", "getppid", "tgkill", "sched_yield", "sched_getaffinity",
                "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid"),
    "signals": ("rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack"),
    "time": ("clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday"),
    "fd io": ("read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
              "preadv2", "pwritev2", "lseek", "close", "fcntl", "ioctl", "dup", "dup3",
              "fstat", "newfstatat", "statx", "fsync", "fdatasync", "fallocate", "ftruncate",
              "eventfd2", "pipe2", "getrandom"),
    "waiting": ("poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl",
                "epoll_wait", "epoll_pwait"),
    "sockets": ("socket", "connect", "accept", "accept4", "recvfrom", "recvmsg", "sendto",
                "sendmsg", "shutdown", "getsockopt", "setsockopt", "getsockname", "getpeername"),
    "state folder": ("openat", "unlink", "unlinkat", "rename", "renameat", "renameat2",
                     "getdents64", "readlink", "getcwd", "umask", "fchmod"),
    # `vmctl snapshot` of a running machine, served by the VMM: the snapshot's folder, the
    # overlay hard-linked into a read-only layer, its write check (the kvm tier run with
    # the sandbox on found mkdir missing: the VMM died with SIGSYS)
    # the FUSE file server of virtio-fs (`mounts:`), answering the guest's file operations in
    # the shared folder (a test drives every operation under the filter: fchownat killed it)
    "shared folders": ("fchownat", "symlinkat", "mknodat", "utimensat", "readlinkat", "fstatfs"),
    "snapshots": ("mkdir", "mkdirat", "link", "linkat", "chmod", "fchmodat", "rmdir",
                  "access", "faccessat", "faccessat2"),
}
SANDBOX_USER = "nobody"


def allowed() -> list[str]:
    return sorted({name for group in ALLOWED_SYSCALLS.values() for name in group})


@dataclass
class SandboxState:
    """What protects this process now (for `vmctl status` and logs)."""

    user: str
    no_new_privs: bool
    seccomp: str  # "off", "strict" or "filter"
    allowed_syscalls: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"user": self.user, "no_new_privs": self.no_new_privs, "seccomp": self.seccomp,
                "allowed_syscalls": self.allowed_syscalls, "notes": self.notes}


def available() -> str | None:
    """None when a filter can be installed here, else why not (for host-check)."""
    try:
        import pyseccomp  # noqa: F401
    except ImportError:
        return "pyseccomp is not installed (pip extra `sandbox`; Debian: libseccomp2)"
    except OSError as error:
        return f"libseccomp cannot be loaded: {error}"
    return None


def current() -> SandboxState:
    """Read this process's protections from /proc/self/status."""
    fields: dict[str, str] = {}
    with open("/proc/self/status") as file:
        for line in file:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    mode = {"0": "off", "1": "strict", "2": "filter"}.get(fields.get("Seccomp", "0"), "off")
    import pwd

    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    return SandboxState(user, fields.get("NoNewPrivs") == "1", mode)


def enter(drop_user: str | None = SANDBOX_USER, writable: Sequence[str] = ()) -> SandboxState:
    """Drop privileges (when `drop_user`; `writable` paths are handed to that user first),
    then install the filter on every thread (TSYNC). Irreversible for this process."""
    import pwd

    import pyseccomp

    notes = []
    if drop_user and os.geteuid() == 0:
        entry = pwd.getpwnam(drop_user)
        for path in writable:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.setgroups([])
        os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
        os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)  # all capabilities go too
    elif drop_user:
        notes.append("already unprivileged")
    flt = pyseccomp.SyscallFilter(defaction=pyseccomp.KILL_PROCESS)
    names = allowed()
    count = 0
    for name in names:
        try:
            flt.add_rule(pyseccomp.ALLOW, name)
            count += 1
        except (ValueError, OSError, RuntimeError):  # not a system call on this architecture
            notes.append(f"{name}: unknown here")
    for option in (15, 16):  # prctl only for PR_SET_NAME / PR_GET_NAME (thread names)
        flt.add_rule(pyseccomp.ALLOW, "prctl", pyseccomp.Arg(0, pyseccomp.EQ, option))
    flt.set_attr(pyseccomp.Attr.CTL_NNP, 1)  # no_new_privs, set by libseccomp before loading
    flt.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)  # every existing thread gets the filter too
    flt.load()
    state = current()
    state.allowed_syscalls = count
    state.notes = notes
    return state
