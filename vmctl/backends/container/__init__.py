"""The `container` backend: the same machine spec run as an OCI container (crun, or runc).

    bundle.py   MachineSpec -> OCI config.json (pure; unit-tested)
    rootfs.py   the base image tree as a read-only overlayfs lower layer, one upper per container
    runtime.py  the OCI runtime binary: create/start/state/kill/delete/exec
    network.py  a veth pair with a /30, the container's counterpart of a VM's TAP
    monitor.py  the per-container process that owns all of the above while it runs
    backend.py  the Backend the lifecycle commands call
"""

from .backend import ContainerBackend

__all__ = ["ContainerBackend"]
