"""OCI config.json generation for `backend: container`: each spec field, parsed back as JSON."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import pytest

from vmctl.backends.container.backend import check_spec
from vmctl.backends.container.bundle import DEFAULT_CAPABILITIES, DENIED_SYSCALLS, IDLE_SCRIPT, build_config
from vmctl.errors import VmctlError
from vmctl.spec import parse_spec


def config_of(document: dict, arch: str = "x86_64") -> dict:
    spec = parse_spec({"name": "box", "backend": "container", **document}).machines[0]
    text = json.dumps(build_config(spec, "/state/box/rootfs/merged", "/vmctl/vmctl-box-1234", arch=arch))
    return json.loads(text)  # what the runtime reads


def test_memory_and_cpus_become_cgroup_limits():
    resources = config_of({"memory": "96M", "cpus": 3})["linux"]["resources"]
    assert resources["memory"] == {"limit": 96 << 20}
    assert resources["cpu"] == {"quota": 300_000, "period": 100_000}
    assert config_of({})["linux"]["resources"]["memory"]["limit"] == 256 << 20  # the spec's default


def test_command_runs_through_the_shell_like_in_the_vm():
    process = config_of({"command": ["echo", "a b", "$HOME"]})["process"]
    assert process["args"] == ["/bin/sh", "-c", "echo 'a b' '$HOME'"]
    assert config_of({"command": "echo $HOME; exit 3"})["process"]["args"] == ["/bin/sh", "-c", "/bin/sh -c 'echo $HOME; exit 3'"]


def test_no_command_idles_until_sigterm():
    process = config_of({})["process"]
    assert process["args"] == ["/bin/sh", "-c", IDLE_SCRIPT]
    assert "trap" in IDLE_SCRIPT and "TERM" in IDLE_SCRIPT


def test_environment_is_added_after_the_defaults():
    env = config_of({"environment": {"GREETING": "hi there", "PATH": "/bin"}})["process"]["env"]
    assert "GREETING=hi there" in env
    assert [e for e in env if e.startswith("PATH=")] == ["PATH=/bin"]  # the spec overrides a default
    assert "HOSTNAME=box" in env


def test_name_is_the_hostname_and_root_is_the_overlay():
    config = config_of({})
    assert config["hostname"] == "box"
    assert config["root"] == {"path": "/state/box/rootfs/merged", "readonly": False}
    assert config["linux"]["cgroupsPath"] == "/vmctl/vmctl-box-1234"
    assert config["process"]["user"] == {"uid": 0, "gid": 0}
    assert config["process"]["terminal"] is False  # output goes to console.log


@pytest.mark.parametrize("mode", ["none", "isolated", "nat"])
def test_every_network_mode_gets_its_own_network_namespace(mode):
    namespaces = [n["type"] for n in config_of({"network": mode})["linux"]["namespaces"]]
    assert namespaces == ["pid", "mount", "ipc", "uts", "network"]
    assert all("path" not in n for n in config_of({"network": mode})["linux"]["namespaces"])


def test_mounts():
    mounts = {m["destination"]: m for m in config_of({})["mounts"]}
    assert set(mounts) == {"/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/tmp"}
    assert "ro" in mounts["/sys"]["options"] and "ro" in mounts["/sys/fs/cgroup"]["options"]
    assert mounts["/tmp"]["type"] == "tmpfs" and mounts["/dev"]["type"] == "tmpfs"
    assert mounts["/dev/pts"]["type"] == "devpts"


def test_capabilities_are_dockers_default_set():
    capabilities = config_of({})["process"]["capabilities"]
    assert len(DEFAULT_CAPABILITIES) == 14
    for kind in ("bounding", "effective", "permitted"):
        assert capabilities[kind] == list(DEFAULT_CAPABILITIES)
    assert capabilities["ambient"] == [] and "CAP_SYS_ADMIN" not in capabilities["bounding"]
    assert config_of({})["process"]["noNewPrivileges"] is True


def test_seccomp_denies_a_short_list_with_eperm():
    seccomp = config_of({})["linux"]["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ALLOW"
    assert seccomp["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    (rule,) = seccomp["syscalls"]
    assert rule["action"] == "SCMP_ACT_ERRNO" and rule["errnoRet"] == 1
    assert {"kexec_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "mount"} <= set(rule["names"])
    assert rule["names"] == list(DENIED_SYSCALLS)
    assert config_of({}, arch="aarch64")["linux"]["seccomp"]["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]


def test_denied_syscalls_are_real_syscall_names():
    """A typo would make the runtime reject the whole profile: check against the kernel headers."""
    try:
        headers = subprocess.run(["cpp", "-dM", "-include", "sys/syscall.h", "/dev/null"],
                                 capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no C preprocessor / kernel headers to check syscall names against")
    for name in DENIED_SYSCALLS:
        assert f"__NR_{name} " in headers, name


@pytest.mark.parametrize("field, value, where", [
    ("disks", "[{size: 1G}]", "machines.box.disks"), ("cmdline", "console=ttyS0", "machines.box.cmdline"),
    ("libvirt", "{domain_type: qemu}", "machines.box.libvirt"),
    ("network", "{mode: nat, forwards: ['8080:80']}", "machines.box.network.forwards"),
])
def test_fields_a_container_cannot_use_are_errors_at_their_line_and_column(field, value, where):
    text = f"machines:\n  box:\n    backend: container\n    {field}: {value}\n"
    column = 5 if field != "network" else 5 + len("network: {mode: nat, ")
    with pytest.raises(VmctlError, match=f"^c1.yaml:4:{column}: {where}: not supported with backend: container"):
        parse_spec(text, source="c1.yaml")


def test_the_backend_still_refuses_what_a_container_cannot_use():
    from vmctl.spec.model import DiskSpec

    spec = parse_spec({"name": "box", "backend": "container"}).machines[0]
    with pytest.raises(VmctlError, match="disks: not supported with backend: container"):
        check_spec(dataclasses.replace(spec, disks=(DiskSpec(image=None, size=1 << 30),)))


# Runtime choice and cgroup checks, against fake /sys/fs/cgroup layouts.

def fake_cgroups(root, layout: str):
    if layout == "unified":
        root.mkdir(parents=True)
        (root / "cgroup.controllers").write_text("cpuset cpu io pids\n")  # no memory
    else:  # hybrid, with hugetlb on v2 (this development host)
        for name in ("cpu,cpuacct", "memory", "pids", "unified"):
            (root / name).mkdir(parents=True)
        (root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    return root


def test_a_missing_cgroup_controller_is_named(tmp_path, monkeypatch):
    from vmctl.backends.container import runtime

    monkeypatch.setattr(runtime, "CGROUP_ROOT", fake_cgroups(tmp_path / "v2", "unified"))
    assert runtime.cgroup_mode() == "unified"
    with pytest.raises(VmctlError, match=r"cgroup controller 'memory' is missing .*lists cpu cpuset io pids.*`memory` limit"):
        runtime.check_controllers()
    monkeypatch.setattr(runtime, "CGROUP_ROOT", fake_cgroups(tmp_path / "hybrid", "hybrid"))
    assert runtime.cgroup_mode() == "hybrid"
    runtime.check_controllers()  # cpu (in cpu,cpuacct) and memory are there


def fake_binaries(folder, *names):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(0o755)
    return str(folder)


def test_runtime_choice(tmp_path, monkeypatch):
    from vmctl.backends.container import runtime

    monkeypatch.delenv("VMCTL_OCI_RUNTIME", raising=False)
    monkeypatch.setattr(runtime, "CGROUP_ROOT", fake_cgroups(tmp_path / "hybrid", "hybrid"))
    monkeypatch.setenv("PATH", fake_binaries(tmp_path / "none"))
    with pytest.raises(VmctlError, match=r"^no OCI runtime .*install crun \(Debian: apt-get install crun\)$"):
        runtime.choose()
    monkeypatch.setenv("PATH", fake_binaries(tmp_path / "both", "crun", "runc"))
    assert runtime.choose().name == "runc"  # crun refuses this hybrid layout
    monkeypatch.setenv("PATH", fake_binaries(tmp_path / "crun-only", "crun"))
    with pytest.raises(VmctlError, match=r"hybrid mode with controllers on v2 \(hugetlb\).*Debian package `runc`"):
        runtime.choose()
    monkeypatch.setattr(runtime, "CGROUP_ROOT", fake_cgroups(tmp_path / "v2", "unified"))
    monkeypatch.setenv("PATH", fake_binaries(tmp_path / "both", "crun", "runc"))
    assert runtime.choose().name == "crun"
    monkeypatch.setenv("VMCTL_OCI_RUNTIME", "runc")
    assert runtime.choose().name == "runc"
    monkeypatch.setenv("VMCTL_OCI_RUNTIME", "youki")
    with pytest.raises(VmctlError, match="VMCTL_OCI_RUNTIME=youki: not found on PATH"):
        runtime.choose()
