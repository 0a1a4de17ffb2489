"""`vmctl snapshot create|list|restore|delete`, `vmctl stop`, `vmctl start`, and the clone
half of `vmctl up --from-snapshot` (docs/snapshots.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..backends import get_backend
from ..errors import VmctlError
from ..state import StateStore


def register(subparsers: argparse._SubParsersAction) -> None:
    snapshot = subparsers.add_parser(
        "snapshot", help="disk snapshots of machines, memory snapshots of native ones",
        description="A disk snapshot freezes each overlay vmctl made for the machine into a read-only layer "
        "(the machine goes on over a new overlay; no data is copied): qcow2 overlays of native (kvm) and "
        "libvirt machines (a running domain through libvirt's external disk-only snapshot), the overlayfs "
        "upper layer of a container. Containers are snapshotted while stopped; libvirt machines and "
        "containers are restored, and their snapshots deleted, while stopped. --memory also saves the running "
        "guest (vCPUs, devices, RAM): `snapshot restore` continues it, and for native machines `vmctl up "
        "--from-snapshot` starts clones that continue it in milliseconds instead of booting (libvirt: "
        "through a libvirt save image).",
        epilog="examples:\n  vmctl snapshot create --memory db ready\n  vmctl up --from-snapshot ready --name db2\n"
        "  vmctl snapshot list\n  vmctl stop db && vmctl snapshot restore db ready\n  vmctl snapshot delete ready",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = snapshot.add_subparsers(dest="verb", metavar="VERB", required=True)
    create = verbs.add_parser("create", help="snapshot a machine's disks (and, with --memory, its running guest)")
    create.add_argument("name", help="machine")
    create.add_argument("snapshot", help="snapshot name (letters, digits, - _ .)")
    create.add_argument("--memory", action="store_true",
                        help="also save the running guest (memory, vCPUs, devices); native and libvirt machines")
    create.set_defaults(func=cmd_create)
    listing = verbs.add_parser("list", help="list snapshots")
    listing.add_argument("name", nargs="?", help="only this machine's")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)
    restore = verbs.add_parser("restore", help="put a stopped machine back to a snapshot (a memory snapshot restarts it)")
    restore.add_argument("name")
    restore.add_argument("snapshot")
    restore.set_defaults(func=cmd_restore)
    delete = verbs.add_parser("delete", help="delete a snapshot (refused while clones or later snapshots read it)")
    delete.add_argument("snapshot")
    delete.set_defaults(func=cmd_delete)

    stop = subparsers.add_parser(
        "stop", help="stop machines, keeping their disks to start them again",
        description="Shut each guest down (through its agent; the VM is stopped after --timeout), keeping its "
        "overlays and state: `vmctl ps` shows it stopped, `vmctl start` boots it again from the same disks. "
        "A libvirt domain is shut down (ACPI), destroyed after --timeout, and stays defined; a container "
        "is stopped (SIGTERM, then SIGKILL) keeping its upper layer; `start` runs it again on it.")
    stop.add_argument("names", nargs="+")
    stop.add_argument("--timeout", type=float, default=10, help="seconds before the VM is stopped (default 10)")
    stop.set_defaults(func=cmd_stop)
    start = subparsers.add_parser("start", help="start stopped machines again",
                                  description="Boot stopped machines again from their own disks.")
    start.add_argument("names", nargs="+")
    start.add_argument("--no-wait", action="store_true")
    start.add_argument("--timeout", type=float, default=300)
    start.set_defaults(func=cmd_start)


def _stores():
    from ..snapshot.snapshot_store import SnapshotStore

    return StateStore(), SnapshotStore()


def _take(store: StateStore, record, snapshots, args: argparse.Namespace):
    if record.backend == "kvm":
        from ..backends.kvm_snapshot import take

        return take(store, record, snapshots, args.snapshot, args.memory)
    if args.memory and record.backend == "libvirt":
        from ..backends.libvirt.memory_snapshots import take as save_libvirt

        return save_libvirt(get_backend("libvirt"), store, record, snapshots, args.snapshot)
    if args.memory:
        raise VmctlError(f"{record.name}: --memory snapshots are for native (kvm) and libvirt machines; this one is "
                         f"{record.backend} (vmctl snapshot create {record.name} {args.snapshot} snapshots its disks)")
    if record.backend == "libvirt":
        from ..backends.libvirt.disk_snapshots import take as take_libvirt

        return take_libvirt(get_backend("libvirt"), store, record, snapshots, args.snapshot)
    from ..backends.container.layer_snapshots import take as take_container

    return take_container(store, record, snapshots, args.snapshot)


def cmd_create(args: argparse.Namespace) -> int:
    store, snapshots = _stores()
    with store.locked():
        record = store.load(args.name)
        started = time.monotonic()
        meta = _take(store, record, snapshots, args)
    size = f", {meta.memory_bytes >> 20} MiB of memory" if meta.kind == "memory" else ""
    print(f"{args.snapshot}: {meta.kind} snapshot of {args.name} ({len(meta.layers)} disk layer(s){size}) "
          f"in {time.monotonic() - started:.2f} s", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    _, snapshots = _stores()
    found = [m for m in snapshots.list() if not args.name or m.machine == args.name]
    if args.json:
        print(json.dumps([{"name": m.name, "machine": m.machine, "backend": m.backend, "kind": m.kind, "created": m.created,
                           "layers": len(m.layers), "memory_bytes": m.memory_bytes} for m in found], indent=2))
        return 0
    print(f"{'SNAPSHOT':20} {'MACHINE':16} {'KIND':7} {'LAYERS':>6} {'MEMORY':>8}  CREATED")
    for meta in found:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.created))
        memory = f"{meta.memory_bytes >> 20}M" if meta.kind == "memory" else "-"
        print(f"{meta.name:20} {meta.machine:16} {meta.kind:7} {len(meta.layers):>6} {memory:>8}  {created}")
    for name in snapshots.incomplete():
        print(f"{name:20} {'?':16} {'broken':7} {'-':>6} {'-':>8}  (interrupted: vmctl snapshot delete {name})")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    store, snapshots = _stores()
    with store.locked():
        record = store.load(args.name)
        meta = snapshots.load(args.snapshot)
        if meta.backend != record.backend:
            raise VmctlError(f"snapshot {meta.name!r} is of a {meta.backend} machine; {args.name} is {record.backend}")
        started = False
        if record.backend == "kvm":
            from ..backends.kvm_snapshot import restore

            started = restore(store, record, snapshots, meta)
        else:
            if meta.machine != record.name:
                raise VmctlError(f"snapshot {meta.name!r} is of machine {meta.machine!r}, not {record.name!r}")
            if record.backend == "libvirt" and meta.kind == "memory":
                from ..backends.libvirt.memory_snapshots import restore as resume_libvirt

                resume_libvirt(get_backend("libvirt"), store, record, snapshots, meta)
                started = True
            elif record.backend == "libvirt":
                from ..backends.libvirt.disk_snapshots import restore as restore_libvirt

                restore_libvirt(get_backend("libvirt"), store, record, snapshots, meta)
            else:
                from ..backends.container.layer_snapshots import restore as restore_container

                restore_container(store, record, snapshots, meta)
    print(f"{args.name}: restored to {args.snapshot}" + (" and started" if started else " (vmctl start boots it)"),
          file=sys.stderr)
    return 0


def _delete(store: StateStore, snapshots, name: str) -> str:
    from ..backends.container.layer_snapshots import delete as delete_container
    from ..backends.container.layer_snapshots import recover as recover_container
    from ..backends.kvm_snapshot import delete
    from ..backends.libvirt.disk_snapshots import delete as delete_libvirt
    from ..backends.libvirt.disk_snapshots import recover as recover_libvirt

    folder = snapshots.folder(name)
    if folder.is_dir() and name in snapshots.incomplete():
        # an interrupted create: whichever backend's machine stands on it undoes it
        done = recover_container(store, folder)
        if done is None:
            done = recover_libvirt(get_backend("libvirt"), store, folder)
        return done or delete(store, snapshots, name)
    meta = snapshots.load(name)
    if meta.backend == "libvirt":
        return delete_libvirt(get_backend("libvirt"), store, snapshots, meta)
    if meta.backend == "container":
        return delete_container(store, snapshots, meta)
    return delete(store, snapshots, name)


def cmd_delete(args: argparse.Namespace) -> int:
    store, snapshots = _stores()
    with store.locked():
        print(f"{args.snapshot}: {_delete(store, snapshots, args.snapshot)}", file=sys.stderr)
    return 0


def _stoppable(store: StateStore, name: str):
    record = store.load(name)
    if record.ephemeral:
        raise VmctlError(f"{name}: ephemeral: it is removed when it stops (vmctl down); stop and start "
                         f"are for machines that keep their disks")
    return record


def cmd_stop(args: argparse.Namespace) -> int:
    from ..backends.kvm_snapshot import stop

    store, _ = _stores()
    with store.locked():
        for name in args.names:
            record = _stoppable(store, name)
            stop(store, record, get_backend(record.backend), args.timeout)
            print(f"{name}: stopped (vmctl start {name} boots it again)", file=sys.stderr)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from ..backends.kvm_snapshot import restart

    store, _ = _stores()
    records = []
    with store.locked():
        for name in args.names:
            record = _stoppable(store, name)
            if record.backend == "kvm":
                restart(store, record)
            else:
                if get_backend(record.backend).status(store, record).state == "running":
                    raise VmctlError(f"{name}: already running")
                get_backend(record.backend).restart(store, record)
            records.append(record)
            print(f"{name}: started (pid {record.pid})", file=sys.stderr)
    if not args.no_wait:
        for record in records:
            seconds = get_backend(record.backend).wait_ready(store, record, args.timeout)
            print(f"{record.name}: ready in {seconds:.2f} s", file=sys.stderr)
    return 0


def clone_from_snapshot(snapshot: str, name: str, no_wait: bool, timeout: float) -> int:
    """`vmctl up --from-snapshot SNAP --name NAME`."""
    from ..backends.kvm_snapshot import clone

    store, snapshots = _stores()
    started = time.monotonic()
    with store.locked():
        if store.exists(name):
            raise VmctlError(f"machine {name!r} already exists (vmctl rm {name} first)")
        record = clone(store, snapshots, _kvm_snapshot(snapshots, snapshot), name)
    print(f"{name}: started from snapshot {snapshot} (pid {record.pid})", file=sys.stderr)
    if not no_wait:
        get_backend(record.backend).wait_ready(store, record, timeout)
        print(f"{name}: ready in {time.monotonic() - started:.2f} s", file=sys.stderr)
    return 0


def clone_record(store: StateStore, spec, spec_file: str):
    """`snapshot: SNAP` in YAML: machine `spec.name` as a clone of SNAP (store locked by the caller)."""
    from ..backends.kvm_snapshot import clone
    from ..snapshot.snapshot_store import SnapshotStore

    if spec.backend != "kvm":
        raise VmctlError(f"{spec.source}: snapshot: only native (kvm) machines start from snapshots")
    snapshots = SnapshotStore(store.root.parent)
    return clone(store, snapshots, _kvm_snapshot(snapshots, spec.snapshot), spec.name, spec_file)


def _kvm_snapshot(snapshots, name: str):
    """A snapshot clones can start from: a native machine's (libvirt and container snapshots
    are restored onto their own machine only)."""
    meta = snapshots.load(name)
    if meta.backend != "kvm":
        raise VmctlError(f"snapshot {name!r} is of the {meta.backend} machine {meta.machine}: only snapshots of "
                         f"native (kvm) machines start clones (vmctl snapshot restore {meta.machine} {name})")
    return meta
