"""The layer order of vmctl's packages and modules, lowest first: the one place it is written.

A module may import its own layer and the layers below, never one above
(tests/unit/test_layers.py checks every import, lazy ones included; docs/architecture.md
draws the same picture). A new top-level package or module has to be placed here.
"""

from __future__ import annotations

LAYERS: tuple[tuple[str, ...], ...] = (
    # shared basics: no knowledge of VMs (the package's own __init__ is "vmctl")
    ("vmctl", "layers", "errors", "units", "paths", "limits", "proc", "signals", "machine_files", "state_codec"),
    ("kvm",),                       # /dev/kvm ABI and ioctls
    ("memory",),                    # guest memory
    ("arch",),                      # x86-64 setup and the guest-physical memory map
    ("boot",),                      # Linux boot protocol
    ("devices", "disk", "net", "fs"),  # legacy devices, block backends (raw, qcow2), host TAP/NAT, FUSE server
    ("virtio",),                    # virtio-mmio transport, queues, devices
    ("images", "plans", "snapshot"),  # reference images, typed backend records, snapshot files
    ("guest_contract",),            # what vmctl and its guests promise each other
    ("vmm", "procmem"),             # the native VMM: machine, daemon, agent, console
    ("state", "ssh", "launcher", "host_probe", "peers"),  # machine store, SSH...
    ("oci", "nested"),              # OCI image store; the nested test host
    ("spec",),                      # YAML -> MachineSpec
    ("backends",),                  # kvm, libvirt, container: MachineSpec -> running machine
    ("suite", "testing", "transfer", "probes", "reaper"),  # comparison suite, pytest plugin, cp, ready/provision, owner watchdog
    ("cli", "entry", "__main__"),   # the command line
)


def layer_of(component: str) -> int | None:
    """The index in LAYERS of a top-level package or module of vmctl (None: not placed)."""
    for index, names in enumerate(LAYERS):
        if component in names:
            return index
    return None
