"""`pmem:` in YAML: a read-only raw ext4 base for virtio-pmem + DAX; one-line errors with
file:line, what the kvm backend makes of it, and the backends that refuse it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vmctl.disk.ext4_super import check_dax_base
from vmctl.errors import VmctlError
from vmctl.spec import parse_spec


def mkfs(path: Path, block: int = 4096, size_mib: int = 8) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-F", "-q", "-b", str(block), str(path)], check=True, capture_output=True)
    return path


@pytest.fixture
def base(tmp_path) -> Path:
    return mkfs(tmp_path / "base.ext4")


def spec_text(entries: str, backend: str = "kvm") -> str:
    return f"machines:\n  vm:\n    backend: {backend}\n    pmem:\n{entries}"


def test_pmem_parses(tmp_path, base):
    machine = parse_spec(spec_text("      - {image: base.ext4, guest: /mnt/base/}\n"), source="p.yaml",
                         base_dir=tmp_path).machines[0]
    (entry,) = machine.pmem
    assert (entry.image, entry.guest) == (base.resolve(), "/mnt/base")


@pytest.mark.parametrize("entry, message", [
    ("{image: MISSING, guest: /b}", "no such file"),
    ("{image: QCOW2, guest: /b}", "a qcow2 image, not raw ext4"),
    ("{image: TEXT, guest: /b}", "not a raw ext2/3/4 file system"),
    ("{image: SMALLBLOCKS, guest: /b}", "1024-byte blocks; DAX needs 4096"),
    ("{image: DIRTY, guest: /b}", "journal needs recovery"),
    ("{image: BASE, guest: /b, read_only: false}", "pmem bases are read-only"),
    ("{image: BASE, guest: relative}", "not an absolute path"),
    ("{image: BASE, guest: /proc}", "system mount"),
    ("{image: BASE}", "missing"),
    ("{image: BASE, guest: /b, dax: true}", "unknown key"),
])
def test_bad_entries_are_one_line_errors_at_their_line(tmp_path, base, entry, message):
    qcow2 = tmp_path / "x.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + bytes(4096))
    text = tmp_path / "text"
    text.write_bytes(b"hello" * 1000)
    small = mkfs(tmp_path / "small.ext4", block=1024)
    dirty = mkfs(tmp_path / "dirty.ext4")
    with open(dirty, "r+b") as handle:  # set INCOMPAT_RECOVER as a crash would leave it
        handle.seek(1024 + 96)
        flags = int.from_bytes(handle.read(4), "little") | 0x4
        handle.seek(1024 + 96)
        handle.write(flags.to_bytes(4, "little"))
    entry = (entry.replace("QCOW2", str(qcow2)).replace("TEXT", str(text)).replace("SMALLBLOCKS", str(small))
             .replace("DIRTY", str(dirty)).replace("BASE", str(base)).replace("MISSING", str(tmp_path / "nope")))
    with pytest.raises(VmctlError) as caught:
        parse_spec(spec_text(f"      - {entry}\n"), source="p.yaml", base_dir=tmp_path)
    text_ = str(caught.value)
    assert message in text_ and "\n" not in text_ and text_.startswith("p.yaml:5:"), text_


def test_the_same_mount_point_twice_is_refused(tmp_path, base):
    with pytest.raises(VmctlError, match="mounted twice"):
        parse_spec(spec_text(f"      - {{image: {base}, guest: /b}}\n      - {{image: {base}, guest: /b/}}\n"),
                   source="p.yaml", base_dir=tmp_path)


def test_container_backend_refuses_pmem(tmp_path, base):
    with pytest.raises(VmctlError, match="pmem: not supported with backend: container"):
        parse_spec(spec_text(f"      - {{image: {base}, guest: /b}}\n", backend="container"), source="p.yaml",
                   base_dir=tmp_path)


def test_check_dax_base_returns_the_size(base):
    assert check_dax_base(base) == 8 << 20


def test_kvm_plan_carries_the_base_and_init_word(tmp_path, base, monkeypatch):
    from vmctl.backends import kvm_prepare
    from vmctl.guest_contract import InitArgs, ReferenceImages

    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k")
    monkeypatch.setattr(kvm_prepare, "reference_images",
                        lambda profile: ReferenceImages(kernel, tmp_path / "initramfs", None))
    machine = parse_spec(spec_text(f"      - {{image: {base}, guest: /mnt/base}}\n"), source="p.yaml",
                         base_dir=tmp_path).machines[0]
    (tmp_path / "m").mkdir()
    plan = kvm_prepare.prepare(machine, tmp_path / "m")
    assert [(p.path, p.guest) for p in plan.pmem] == [(str(base.resolve()), "/mnt/base")]
    assert InitArgs(pmem=["/mnt/base"]).words()[0] in plan.cmdline.split()


def test_libvirt_backend_refuses_pmem(tmp_path, base):
    from vmctl.backends.libvirt.plan import domain_plan

    machine = parse_spec(spec_text(f"      - {{image: {base}, guest: /b}}\n", backend="libvirt"), source="p.yaml",
                         base_dir=tmp_path).machines[0]
    with pytest.raises(VmctlError, match="pmem: not supported with backend: libvirt"):
        domain_plan(machine, uuid="u", domain_type="kvm", disks=(), console_log="c", agent_socket=None,
                    run_as=None, state_folder=str(tmp_path))


def test_a_mount_point_of_both_mounts_and_pmem_is_refused(tmp_path, base):
    text = (f"machines:\n  vm:\n    mounts:\n      - {{host: {tmp_path}, guest: /b}}\n"
            f"    pmem:\n      - {{image: {base}, guest: /b}}\n")
    with pytest.raises(VmctlError, match="'/b' is both a `mounts` and a `pmem` mount point"):
        parse_spec(text, source="p.yaml", base_dir=tmp_path)
