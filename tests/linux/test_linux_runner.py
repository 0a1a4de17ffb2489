"""The `linux_runner` fixture: one command on a Linux host with hardware KVM, either mode."""

from __future__ import annotations

from vmctl.nested import LinuxRunner


def test_runs_where_dev_kvm_is_hardware_backed(linux_runner: LinuxRunner) -> None:
    script = 'echo "nested=${VMCTL_NESTED:-0} extra=$EXTRA"; ls /sys/module | grep -xE "kvm_(amd|intel)"'
    result = linux_runner.run(["sh", "-c", script], env={"EXTRA": "yes"}, timeout=600)
    assert result.exit_code == 0, result.stderr
    expected = "1" if linux_runner.mode == "nested" else "0"
    assert result.stdout.splitlines()[0] == f"nested={expected} extra=yes"
    assert result.stdout.splitlines()[1] in ("kvm_amd", "kvm_intel")
