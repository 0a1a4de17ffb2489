"""Image steps: skipping current outputs, atomic writes, error messages, the busybox rootfs
packed as ext4 (checked with debugfs), qcow2 and initramfs. The kernel is not built here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmctl.cli import main as cli_main
from vmctl.errors import VmctlError
from vmctl.images import build, ext4, kernel, locate, rootfs
from vmctl.images.steps import StepContext, atomic_output, clean_stale, digest, dpkg_version, require_packages

HAVE_TOOLS = all(shutil.which(t) for t in ("mkfs.ext4", "debugfs", "qemu-img", "cpio")) \
    and dpkg_version("busybox-static") is not None
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="needs e2fsprogs, qemu-utils, cpio, "
                                 "busybox-static")


class Messages:
    """A reporter that keeps the progress lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, step: str, message: str) -> None:
        self.lines.append(f"[{step}] {message}")


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          text=True, check=True).stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Messages]:
    if not HAVE_TOOLS:
        pytest.skip("image tools missing")
    cache = tmp_path_factory.mktemp("cache")
    messages = Messages()
    build.build_rootfs("busybox", cache, messages)
    build.build_initramfs("busybox", cache, messages)
    return cache, messages


# --- the step machinery ---

def test_digest_is_stable_and_unambiguous():
    assert digest("a", b"b") == digest(b"a", "b")
    assert digest("ab", "") != digest("a", "b")
    assert len(digest("x")) == 16


def test_atomic_output_renames_only_on_success(tmp_path: Path):
    final = tmp_path / "out" / "artefact"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(final) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert not final.exists()
    assert list(final.parent.iterdir()) == []  # no half-written temp left behind
    with atomic_output(final) as tmp:
        tmp.write_bytes(b"whole")
    assert final.read_bytes() == b"whole"
    with atomic_output(final) as tmp:  # a rebuild replaces
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new"


def test_atomic_directory_output(tmp_path: Path):
    final = tmp_path / "tree"
    with atomic_output(final, is_dir=True) as tmp:
        (tmp / "f").write_text("x")
        assert not final.exists()
    assert (final / "f").read_text() == "x"


def test_leftovers_of_dead_builds_are_removed(tmp_path: Path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".rootfs.ext4.tmp-{dead.pid}"
    stale.write_bytes(b"partial")
    stale_dir = tmp_path / f".tree.tmp-{dead.pid}"
    (stale_dir / "x").mkdir(parents=True)
    alive = tmp_path / f".kernel.tmp-{os.getppid()}"
    alive.write_bytes(b"someone else's build in progress")
    clean_stale(tmp_path)
    assert not stale.exists() and not stale_dir.exists()
    assert alive.exists()


def test_failed_command_names_step_and_log(tmp_path: Path):
    ctx = StepContext("kernel", tmp_path / "logs" / "kernel-x.log", Messages())
    with pytest.raises(VmctlError) as error:
        ctx.run(["sh", "-c", "echo compiler says no; exit 2"], "compile")
    message = str(error.value)
    assert message.startswith("kernel: compile failed (exit 2)")
    assert str(ctx.log) in message
    assert "compiler says no" in ctx.log.read_text()
    with pytest.raises(VmctlError, match="not found"):
        ctx.run(["/nonexistent/tool"], "tool")


def test_missing_package_names_step_and_log(tmp_path: Path):
    ctx = StepContext("rootfs", tmp_path / "rootfs.log", Messages())
    with pytest.raises(VmctlError) as error:
        require_packages(ctx, ("vmctl-no-such-package-xyz",))
    message = str(error.value)
    assert message.startswith("rootfs: missing Debian package(s) vmctl-no-such-package-xyz")
    assert f"(log: {ctx.log})" in message
    assert "vmctl-no-such-package-xyz" in ctx.log.read_text()


# --- kernel recipe (no compiling) ---

REQUIRED_KERNEL_SYMBOLS = (
    "64BIT PRINTK EARLY_PRINTK SERIAL_8250 SERIAL_8250_CONSOLE TTY BLK_DEV_INITRD "
    "BINFMT_ELF BINFMT_SCRIPT DEVTMPFS DEVTMPFS_MOUNT PROC_FS SYSFS TMPFS EXT4_FS "
    "OVERLAY_FS SMP X86_MPPARSE X86_LOCAL_APIC X86_IO_APIC HYPERVISOR_GUEST KVM_GUEST "
    "PARAVIRT PVH VIRTIO_MMIO VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK VIRTIO_NET NET INET "
    "PACKET UNIX HW_RANDOM_VIRTIO VIRTIO_CONSOLE VSOCKETS VIRTIO_VSOCKETS FUTEX EPOLL SHMEM "
    "MULTIUSER POSIX_TIMERS FILE_LOCKING UNIX98_PTYS").split()


def test_fragment_asks_for_every_required_symbol():
    wanted, unwanted = kernel.fragment_symbols(kernel.FRAGMENT.read_text())
    for symbol in REQUIRED_KERNEL_SYMBOLS:
        assert wanted.get(f"CONFIG_{symbol}") == "y", symbol
    assert "CONFIG_ACPI" in unwanted
    # virtio-pci for QEMU under libvirt (its x86 machines put virtio on PCI), MSI-X for its interrupts
    assert all(wanted.get(f"CONFIG_{name}") == "y" for name in ("PCI", "PCI_MSI", "VIRTIO_PCI", "VIRTIO_MMIO"))


def test_config_check_reports_what_is_missing():
    fragment = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=8\n# CONFIG_PCI is not set\n"
    good = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=8\n# CONFIG_PCI is not set\n"
    assert kernel.config_problems(fragment, good) == []
    bad = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=4\nCONFIG_PCI=y\n"
    assert kernel.config_problems(fragment, bad) == [
        "CONFIG_B (wanted y, got unset)", "CONFIG_N (wanted 8, got 4)",
        "CONFIG_PCI (wanted unset, got y)"]


def test_kernel_key_follows_its_inputs(tmp_path: Path):
    other = tmp_path / "frag.config"
    other.write_bytes(kernel.FRAGMENT.read_bytes() + b"CONFIG_IPV6=y\n")
    base = kernel.inputs()
    assert kernel.inputs().key == base.key
    assert kernel.inputs(other).key != base.key
    assert kernel.KernelInputs("6.1.999-1", base.fragment).key != base.key


def test_up_to_date_kernel_is_not_rebuilt(tmp_path: Path):
    # an existing output directory is what "current" means: nothing runs, no package check
    out = kernel.output_dir(tmp_path, kernel.inputs().key)
    out.mkdir(parents=True)
    messages = Messages()
    assert kernel.build(tmp_path, messages) == out
    assert messages.lines == [f"[kernel] up to date ({out})"]


# --- rootfs, ext4, qcow2, initramfs ---

@needs_tools
def test_busybox_tree_layout(built):
    cache, _ = built
    tree = locate("busybox", cache).rootfs_tree
    assert os.readlink(tree / "bin/sh") == "/bin/busybox"
    assert os.readlink(tree / "sbin/init") == "/init"
    assert (tree / "init").read_bytes() == rootfs.INIT_SCRIPT.read_bytes()
    assert os.access(tree / "init", os.X_OK)
    assert (tree / "etc/passwd").read_text().startswith("root:x:0:0:")
    for applet in ("bin/mount", "sbin/ip", "bin/base64", "sbin/reboot", "bin/hostname"):
        assert os.path.lexists(tree / applet), applet
    # runs as a container rootfs would: a chroot-style command straight from the tree
    out = subprocess.run([str(tree / "bin/busybox"), "echo", "ok"], capture_output=True,
                         text=True, check=True)
    assert out.stdout == "ok\n"


@needs_tools
def test_ext4_holds_the_tree_owned_by_root(built):
    cache, _ = built
    image = locate("busybox", cache).rootfs_ext4
    listing = debugfs(image, "ls -l /")
    for name in ("init", "bin", "sbin", "etc", "dev", "proc", "sys", "tmp", "run", "root"):
        assert f" {name}\n" in listing + "\n" or f" {name} " in listing, name
    init = debugfs(image, "stat /init")
    assert "Mode:  0755" in init and "User:     0" in init
    assert "Fast link dest: \"/bin/busybox\"" in debugfs(image, "stat /bin/sh")
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True)
    assert fsck.returncode == 0


@needs_tools
def test_qcow2_is_a_qcow2_of_the_ext4(built):
    cache, _ = built
    where = locate("busybox", cache)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                      str(where.rootfs_qcow2)], capture_output=True,
                                     check=True).stdout)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == where.rootfs_ext4.stat().st_size
    same = subprocess.run(["qemu-img", "compare", "-q", str(where.rootfs_ext4),
                           str(where.rootfs_qcow2)])
    assert same.returncode == 0


@needs_tools
def test_initramfs_lists_init_and_console(built):
    cache, _ = built
    archive = locate("busybox", cache).initramfs.read_bytes()
    out = subprocess.run(["cpio", "-tv", "--quiet", "--numeric-uid-gid"], input=archive,
                         capture_output=True, check=True).stdout.decode()
    names = {line.split(" -> ")[0].split()[-1]: line for line in out.splitlines()}
    assert names["init"].startswith("-rwxr-xr-x")
    assert names["dev/console"].startswith("crw-------")
    assert names["bin/sh"].startswith("lrwxrwxrwx")
    assert all(line.split()[2:4] == ["0", "0"] for line in out.splitlines())


@needs_tools
def test_second_run_skips_every_step(built):
    cache, first = built
    assert any("assembling the busybox tree" in line for line in first.lines)
    where = locate("busybox", cache)
    before = {name: path.stat().st_mtime_ns for name, path in where.artefacts().items()
              if path.exists() and path.is_file()}
    again = Messages()
    build.build_rootfs("busybox", cache, again)
    build.build_initramfs("busybox", cache, again)
    assert again.lines == [
        f"[rootfs] busybox tree up to date ({where.rootfs_tree})",
        f"[ext4] up to date ({where.rootfs_ext4})",
        f"[qcow2] up to date ({where.rootfs_qcow2})",
        f"[rootfs] busybox tree up to date ({where.rootfs_tree})",
        f"[initramfs] up to date ({where.initramfs})",
    ]
    after = {name: where.artefacts()[name].stat().st_mtime_ns for name in before}
    assert after == before


@needs_tools
def test_initramfs_is_reproducible(built, tmp_path: Path):
    cache, _ = built
    first = locate("busybox", cache).initramfs.read_bytes()
    build.build_initramfs("busybox", tmp_path, Messages())
    assert locate("busybox", tmp_path).initramfs.read_bytes() == first


@needs_tools
def test_tree_of_another_owner_is_root_in_the_image(tmp_path: Path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/motd").write_text("hi\n")
    if os.geteuid() == 0:
        os.chown(tree / "etc/motd", 1000, 1000)
    assert "/etc/motd" in ext4.non_root_owned(tree)
    image = tmp_path / "fs.ext4"
    ctx = StepContext("ext4", tmp_path / "log", Messages())
    ext4.pack(tree, image, 16, "testkey", ctx)
    stat = debugfs(image, "stat /etc/motd")
    assert "User:     0   Group:     0" in stat
    assert debugfs(image, "cat /etc/motd") == "hi\n"


def test_image_size_rule():
    assert ext4.image_size_mib(2 << 20, 128) == 128
    assert ext4.image_size_mib(800 << 20, 128) == 1064


# --- locating, apt mirror, CLI ---

def test_locate_builds_nothing(tmp_path: Path):
    where = locate("busybox", tmp_path)
    assert where.vmlinux == tmp_path / "kernel" / kernel.inputs().key / "vmlinux"
    assert where.rootfs_ext4.parent == where.rootfs_dir
    assert where.rootfs_dir.parent == tmp_path / "rootfs"
    assert set(where.missing()) == set(where.artefacts())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VmctlError):
        locate("gentoo", tmp_path)


def test_cli_paths_json(tmp_path: Path, capsys):
    assert cli_main(["image", "paths", "--json", "--cache-dir", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["vmlinux"] == str(locate("busybox", tmp_path).vmlinux)
    assert data["exists"]["rootfs_qcow2"] is False


def test_apt_mirror_from_sources(tmp_path: Path):
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert rootfs.apt_mirror(apt) == "http://mirror.example/debian"
    (apt / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64] http://list.example/debian bookworm main\n")
    assert rootfs.apt_mirror(apt) == "http://list.example/debian"
    assert rootfs.apt_mirror(tmp_path / "none") is None


def test_dpkg_versions_come_from_the_status_database(tmp_path: Path):
    from vmctl.images.steps import _installed_version

    status = (b"Package: a\nStatus: install ok installed\nVersion: 1.0\nDescription: x\n continued: not a field\n\n"
              b"Package: b\nStatus: deinstall ok config-files\nVersion: 2.0\n\n"
              b"Package: c\nArchitecture: i386\nStatus: deinstall ok config-files\nVersion: 3.0\n\n"
              b"Package: c\nArchitecture: amd64\nStatus: install ok installed\nVersion: 3.1\n")
    assert _installed_version(status, "a") == "1.0"
    assert _installed_version(status, "b") is None  # removed, its configuration kept: not "ii"
    assert _installed_version(status, "c") == "3.1"  # the installed one of two architectures
    assert _installed_version(status, "d") is None and _installed_version(status, "Package: a") is None
    database = tmp_path / "status"
    database.write_bytes(status)
    assert dpkg_version("a", database) == "1.0"
    database.write_bytes(status.replace(b"1.0", b"1.1"))  # a new size: read again
    assert dpkg_version("a", database) == "1.1"
