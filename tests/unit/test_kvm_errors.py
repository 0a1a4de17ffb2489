"""Clear errors when /dev/kvm is absent or not permitted (no KVM needed for the first)."""

from __future__ import annotations

import os

import pytest

from vmctl.errors import VmctlError
from vmctl.host_probe import check_host
from vmctl.kvm.system import Kvm, KvmFlavour


def test_missing_device_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(VmctlError, match=r"/nonexistent/kvm does not exist: load the kvm module"):
        Kvm(str(tmp_path / "nonexistent" / "kvm").replace(str(tmp_path), ""))


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/kvm"), reason="needs root to drop to an unprivileged user, and /dev/kvm")
def test_permission_denied_says_how_to_get_access():
    if os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is world-accessible here")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, try to open /dev/kvm, send back the message
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            Kvm()
            message = "opened"
        except VmctlError as error:
            message = str(error)
        except BaseException as error:  # report anything else instead of running pytest on in the child
            message = repr(error)
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    assert message == "/dev/kvm: permission denied: run as root or add yourself to the 'kvm' group"


def test_flavour_detection_reads_sys_module(tmp_path):
    assert KvmFlavour.detect(str(tmp_path)) == KvmFlavour("unknown", False)
    (tmp_path / "kvm_pvm").mkdir()
    assert KvmFlavour.detect(str(tmp_path)) == KvmFlavour("kvm_pvm", False)
    (tmp_path / "kvm_pvm").rmdir()
    (tmp_path / "kvm_amd").mkdir()
    assert KvmFlavour.detect(str(tmp_path)).hardware_backed


def test_host_check_on_a_missing_device_reports_not_usable():
    report = check_host("/nonexistent/kvm")
    assert not report.usable and report.problem == "/nonexistent/kvm does not exist"
    assert not report.boots_linux
