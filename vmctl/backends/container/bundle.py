"""A machine spec as an OCI runtime bundle's config.json (runtime-spec 1.0).

Pure: no files, no processes; the monitor writes the result next to the root filesystem.
The choices mirror Docker's defaults so the container is an ordinary one, not a hardened or
a privileged one, which is what a VM-vs-container comparison should measure:

- namespaces: pid, mount, ipc, uts and network. The network namespace is always a new one:
  `network: none` leaves it empty (loopback only); isolated/nat get a veth moved in later.
- mounts: /proc, /sys read-only, /sys/fs/cgroup read-only, a tmpfs /dev with devpts, shm and
  mqueue, and a tmpfs /tmp (so scratch files do not land in the overlay's upper layer).
- cgroup limits: `memory` -> memory.limit, `cpus` -> a CFS quota of `cpus` periods.
- capabilities: Docker's default set (DEFAULT_CAPABILITIES); no CAP_SYS_ADMIN.
- seccomp: allow by default, EPERM for a short list (DENIED_SYSCALLS) of calls that act on
  the whole host (kernel modules, kexec, reboot, swap, clock) or escape the namespaces.
  `mount`, `umount2` and `pivot_root` are on the list: the runtime makes its own mounts and
  pivot_root before it loads the filter (just before exec), so they only bind the workload,
  which has no CAP_SYS_ADMIN to use them anyway.
"""

from __future__ import annotations

import platform
import shlex
from typing import TYPE_CHECKING

from ...spec.model import MachineSpec

if TYPE_CHECKING:
    from ...oci.runconfig import Process

OCI_VERSION = "1.0.2"
CPU_PERIOD = 100_000  # microseconds; quota = cpus * period
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default capability set (moby oci/caps/defaults.go).
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)

DENIED_SYSCALLS = (
    "kexec_load", "kexec_file_load",  # replace the host kernel
    "init_module", "finit_module", "delete_module",  # load/unload kernel code
    "reboot",  # in a pid namespace it only kills the container, but there is no use for it
    "swapon", "swapoff", "acct",  # host-wide switches
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",  # the host clock is shared
    "mount", "umount2", "pivot_root",  # see the module docstring
    "unshare", "setns",  # new or other namespaces: the container stays in its own
    "open_by_handle_at",  # the "shocker" escape from a bind mount to the host fs
    "bpf", "perf_event_open",  # kernel-wide instrumentation
    "keyctl", "add_key", "request_key",  # the kernel keyring is not namespaced
)

SECCOMP_ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}

# No command: stay up until stopped. The shell is pid 1, which ignores signals it has no
# handler for, so `down` (SIGTERM) needs the trap; `sleep & wait` lets the trap run at once.
IDLE_SCRIPT = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"

NAMESPACES = ("pid", "mount", "ipc", "uts", "network")


def process_script(command: tuple[str, ...] | list[str]) -> str:
    """What /bin/sh -c runs: the machine's command (as the VM's /init runs it), or idle."""
    return shlex.join(command) if command else IDLE_SCRIPT


def environment(spec: MachineSpec) -> list[str]:
    base = {"PATH": PATH, "HOME": "/root", "HOSTNAME": spec.name}
    base.update(spec.environment)
    return [f"{key}={value}" for key, value in base.items()]


def seccomp_profile(machine: str | None = None) -> dict:
    arch = machine or platform.machine()
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": SECCOMP_ARCHES.get(arch, []),
        "syscalls": [{"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],  # EPERM
    }


def _mounts() -> list[dict]:
    def mount(destination: str, kind: str, source: str, *options: str) -> dict:
        return {"destination": destination, "type": kind, "source": source, "options": list(options)}

    return [
        mount("/proc", "proc", "proc", "nosuid", "noexec", "nodev"),
        mount("/dev", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
        mount("/dev/pts", "devpts", "devpts", "nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"),
        mount("/dev/shm", "tmpfs", "shm", "nosuid", "noexec", "nodev", "mode=1777", "size=65536k"),
        mount("/dev/mqueue", "mqueue", "mqueue", "nosuid", "noexec", "nodev"),
        mount("/sys", "sysfs", "sysfs", "nosuid", "noexec", "nodev", "ro"),
        mount("/sys/fs/cgroup", "cgroup", "cgroup", "nosuid", "noexec", "nodev", "relatime", "ro"),
        mount("/tmp", "tmpfs", "tmpfs", "nosuid", "nodev", "mode=1777"),
    ]


def resources(spec: MachineSpec) -> dict:
    return {
        "devices": [{"allow": False, "access": "rwm"}],  # the runtime adds the standard /dev nodes
        "memory": {"limit": spec.memory},
        "cpu": {"quota": spec.cpus * CPU_PERIOD, "period": CPU_PERIOD},
    }


def build_config(spec: MachineSpec, rootfs: str, cgroups_path: str, arch: str | None = None,
                 process: "Process | None" = None) -> dict:
    """config.json for `spec`, its root filesystem at `rootfs`, its cgroup at `cgroups_path`.
    `process`: what an OCI image says to run (vmctl.oci.runconfig), run as its argv directly
    (the image may have no shell); otherwise the command runs under /bin/sh -c."""
    capabilities = list(DEFAULT_CAPABILITIES)
    if process is not None:
        env = {"HOME": "/root" if process.uid == 0 else "/", "HOSTNAME": spec.name, **process.env}
        user, args, cwd = {"uid": process.uid, "gid": process.gid}, list(process.args), process.cwd
        env_list = [f"{key}={value}" for key, value in env.items()]
    else:
        user, args, cwd = {"uid": 0, "gid": 0}, ["/bin/sh", "-c", process_script(spec.command)], "/"
        env_list = environment(spec)
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,  # stdout/stderr go to the machine's console.log
            "user": user,
            "args": args,
            "env": env_list,
            "cwd": cwd,
            "capabilities": {"bounding": capabilities, "effective": capabilities, "permitted": capabilities,
                             "inheritable": [], "ambient": []},
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": spec.name,
        "mounts": _mounts() + [
            # the host folder itself, not a copy: writes on either side are seen at once
            {"destination": m.guest, "type": "bind", "source": str(m.host),
             "options": ["rbind", "nosuid", "nodev", "ro" if m.read_only else "rw"]}
            for m in spec.mounts],
        "annotations": {"org.vmctl.machine": spec.name},
        "linux": {
            "namespaces": [{"type": kind} for kind in NAMESPACES],
            "cgroupsPath": cgroups_path,
            "resources": resources(spec),
            "seccomp": seccomp_profile(arch),
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
