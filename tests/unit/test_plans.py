"""vmctl.plans and machine.json: typed records per backend, their JSON, schema 1 migration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmctl.errors import VmctlError
from vmctl.plans import (
    SCHEMA_VERSION,
    ContainerRecord,
    DiskPlan,
    ForwardPlan,
    KvmPlan,
    LibvirtRecord,
    NetworkPlan,
    PmemPlan,
    SshAccess,
    plan_from_json,
)
from vmctl.state import MachineRecord, StateStore

pytestmark = pytest.mark.unit

KVM = KvmPlan(cpus=2, memory=512 << 20, kernel="/cache/bzImage", cmdline="console=ttyS0 vmctl.cmd=eA==",
              initrd="/cache/initramfs.cpio", image="busybox", command=("uname", "-a"), environment={"A": "b c"},
              disks=(DiskPlan("/m/disks/root.qcow2", read_only=False, created=True), DiskPlan("/data.raw", True, False)),
              network=NetworkPlan("nat", "52:54:00:00:00:01", (ForwardPlan(8080, 80, "tcp"),)),
              ssh=SshAccess("alice", "/m/ssh/id"), ephemeral=True, pmem=(PmemPlan("/base.ext4", "/mnt/base"),))
LIBVIRT = LibvirtRecord(cpus=1, memory=256 << 20, uri="qemu:///system", domain="vmctl-web", uuid="u-1",
                        console="/m/console.log", agent_socket="/m/agent.sock", ssh=SshAccess())
CONTAINER = ContainerRecord(cpus=1, memory=64 << 20, runtime="crun", container_id="vmctl-c-1", monitor_pid=42,
                            layers=("/s/snapshots/b/upper", "/s/snapshots/a/upper"))


@pytest.mark.parametrize("plan", [KVM, LIBVIRT, CONTAINER], ids=lambda p: p.backend)
def test_each_backend_record_round_trips_through_json(plan):
    text = json.dumps(plan.to_json())
    assert plan_from_json(plan.backend, json.loads(text), "machine.json: plan") == plan


def test_bad_fields_are_named_with_their_file():
    data = KVM.to_json() | {"cpus": "two"}
    with pytest.raises(VmctlError, match=r"^m/machine.json: plan.cpus: expected an integer, got 'two'$"):
        plan_from_json("kvm", data, "m/machine.json: plan")
    data = KVM.to_json()
    data["disks"][1] = {"read_only": True}
    with pytest.raises(VmctlError, match=r"plan.disks\[1\].path: missing"):
        plan_from_json("kvm", data, "plan")
    data = KVM.to_json() | {"network": {"mode": "nat", "forwards": [[8080, 80, "sctp"]]}}
    with pytest.raises(VmctlError, match=r"plan.network.forwards\[0\]: expected \[host port"):
        plan_from_json("kvm", data, "plan")
    with pytest.raises(VmctlError, match=r"unknown backend 'xen'"):
        plan_from_json("xen", {}, "plan")


def test_store_writes_the_schema_and_reads_typed_plans(tmp_path: Path):
    store = StateStore(tmp_path)
    store.create(MachineRecord(name="c", backend="container", plan=CONTAINER))
    raw = json.loads((store.folder("c") / "machine.json").read_text())
    assert raw["schema"] == SCHEMA_VERSION and "spec" not in raw
    record = store.load("c")
    assert record.plan_as(ContainerRecord) == CONTAINER
    with pytest.raises(VmctlError, match=r"c: the machine record has a ContainerRecord, not a KvmPlan"):
        record.plan_as(KvmPlan)


def test_schema_1_records_are_migrated(tmp_path: Path):
    store = StateStore(tmp_path)
    old = {  # as vmctl wrote machine.json before typed plans
        "name": "job", "backend": "container", "spec_file": None, "pid": 7, "created": 1.5, "ephemeral": False,
        "spec": {"cpus": 1, "memory": 67108864, "image": "busybox", "command": ["sleep", "9"],
                 "environment": {}, "network": {"mode": "nat"}, "runtime": "runc", "container_id": "vmctl-job-1"},
        "resources": {"container": ["vmctl-job-1"], "monitor": ["99"]},
    }
    store.folder("job").mkdir(parents=True)
    (store.folder("job") / "machine.json").write_text(json.dumps(old))
    record = store.load("job")
    assert record.plan == ContainerRecord(cpus=1, memory=64 << 20, runtime="runc", container_id="vmctl-job-1",
                                          command=("sleep", "9"), network_mode="nat", monitor_pid=99)
    assert record.resources == {"container": ["vmctl-job-1"]} and record.pid == 7
    kvm_v1 = {"name": "vm", "backend": "kvm", "pid": 8, "created": 2.0, "spec": {
        "cpus": 2, "memory": 536870912, "image": "busybox", "kernel": "/k", "initrd": None, "cmdline": "c",
        "command": [], "environment": {"A": "1"}, "disks": [{"path": "/d", "read_only": False, "created": True}],
        "network": {"mode": "nat", "mac": None, "forwards": [[2222, 22, "tcp"]]}, "ssh": {"user": "root", "key": "/k/id"}}}
    store.folder("vm").mkdir(parents=True)
    (store.folder("vm") / "machine.json").write_text(json.dumps(kvm_v1))
    plan = store.load("vm").plan_as(KvmPlan)
    assert plan.disks == (DiskPlan("/d", False, True),) and plan.network.forwards == (ForwardPlan(2222, 22, "tcp"),)
    assert plan.ssh == SshAccess("root", "/k/id") and plan.environment == {"A": "1"}
    being_created = {"name": "new", "backend": "kvm", "spec": {}}
    store.folder("new").mkdir(parents=True)
    (store.folder("new") / "machine.json").write_text(json.dumps(being_created))
    assert store.load("new").plan is None


def test_a_newer_schema_is_refused_with_a_clear_message(tmp_path: Path):
    store = StateStore(tmp_path)
    store.folder("x").mkdir(parents=True)
    (store.folder("x") / "machine.json").write_text(json.dumps({"schema": 99, "name": "x", "backend": "kvm"}))
    with pytest.raises(VmctlError, match=r"x/machine.json: machine record schema 99, but this vmctl reads "
                                         r"schema 2 \(was it written by a newer vmctl\?\)"):
        store.load("x")


def test_the_vmm_daemon_reads_its_plan_argument_not_the_state_store(tmp_path: Path):
    """A plan the VMM cannot use ends as an outcome naming the field, without a traceback;
    and the daemon module does not import the state store at all."""
    plan_file = tmp_path / "vmm-plan.json"
    plan_file.write_text(json.dumps(KVM.to_json() | {"memory": None}))
    done = subprocess.run([sys.executable, "-m", "vmctl.vmm.daemon", str(tmp_path), str(plan_file)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome["exit_code"] == 1 and "vmm-plan.json.memory: expected an integer, got None" in outcome["reason"]
    probe = subprocess.run([sys.executable, "-c", "import sys, vmctl.vmm.daemon; "
                            "print('vmctl.state' in sys.modules, 'vmctl.backends' in sys.modules)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.split() == ["False", "False"], probe.stderr


def test_container_layers_default_to_none_and_must_be_strings():
    data = CONTAINER.to_json()
    del data["layers"]  # a record from before disk snapshots
    assert plan_from_json("container", data, "m.json: plan").layers == ()
    with pytest.raises(VmctlError, match=r"^m.json: plan.layers: expected a list of strings, got \[1\]$"):
        plan_from_json("container", CONTAINER.to_json() | {"layers": [1]}, "m.json: plan")
