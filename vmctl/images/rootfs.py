"""Recipe: the base root filesystem tree, in three profiles.

busybox: Debian's busybox-static plus a symlink per applet and a few /etc files (seconds).
debian:  `debootstrap --variant=minbase bookworm` with python3, openssh-server and
         busybox-static (minutes, needs root and the network).
bench:   debian plus the benchmark tools of `vmctl compare --suite` (sysbench, fio, iperf3,
         redis-server, redis-tools) and BENCH_DATA_MIB of incompressible files under
         BENCH_DATA_DIR that every instance reads in the page-cache suite. A profile of its own
         so that the debian image (and everyone's cache of it) stays as it is.

Both get vmctl's /init (also reachable as /sbin/init, so no `init=` is needed). The tree
is an ordinary directory: the same one is packed to ext4/qcow2, to an initramfs, and can be
handed to an OCI runtime as a container rootfs (which runs its command directly, not /init).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .steps import Reporter, StepContext, atomic_output, digest, dpkg_version, require_packages, stderr_reporter

RECIPE_VERSION = "rootfs-1"  # bump when a tree's content rules below change
INIT_SCRIPT = Path(__file__).parent / "data" / "init"
BUSYBOX_PACKAGE = "busybox-static"
FIXED_MTIME = 1_700_000_000  # every file of the busybox tree gets this mtime
DEBIAN_SUITE = "bookworm"
DEBIAN_INCLUDE = ("python3", "openssh-server", "busybox-static")
BENCH_INCLUDE = DEBIAN_INCLUDE + ("sysbench", "fio", "iperf3", "redis-server", "redis-tools")
BENCH_DATA_DIR = "srv/vmctl-bench"  # relative to the tree's root
BENCH_DATA_FILES = 8  # files of BENCH_DATA_MIB / BENCH_DATA_FILES MiB each
BENCH_DATA_MIB = 256


@dataclass(frozen=True)
class Profile:
    name: str
    host_packages: tuple[str, ...]  # Debian packages the host needs to build it
    min_size_mib: int  # smallest ext4 image; free space costs nothing in a sparse qcow2
    description: str


PROFILES = {
    "busybox": Profile("busybox", (BUSYBOX_PACKAGE,), 128,
                       "busybox-static userland with vmctl's /init"),
    "debian": Profile("debian", ("debootstrap", BUSYBOX_PACKAGE), 1024,
                      "Debian bookworm minbase with python3, openssh-server, busybox"),
    "bench": Profile("bench", ("debootstrap", BUSYBOX_PACKAGE), 1536,
                     "debian plus sysbench, fio, iperf3, redis and 256 MiB of shared data files"),
}


def profile(name: str) -> Profile:
    from ..errors import VmctlError

    try:
        return PROFILES[name]
    except KeyError:
        raise VmctlError(f"unknown rootfs profile {name!r} (one of: "
                         f"{', '.join(PROFILES)})") from None


def key(prof: Profile, mirror: str | None = None) -> str:
    """Hash of everything the tree is made from (missing packages hash as 'missing')."""
    return digest(base_key(prof, mirror), INIT_SCRIPT.read_bytes())


def base_key(prof: Profile, mirror: str | None = None) -> str:
    """Hash of everything but vmctl's /init: a debootstrapped tree is kept under it, so that a
    change of /init costs a copy of the tree, not another debootstrap."""
    parts: list[str | bytes] = [RECIPE_VERSION, prof.name]
    parts += [f"{p}={dpkg_version(p) or 'missing'}" for p in prof.host_packages]
    if prof.name in ("debian", "bench"):
        parts += [DEBIAN_SUITE, ",".join(_include(prof)), mirror or apt_mirror() or "debootstrap default"]
    if prof.name == "bench":
        parts += [f"data={BENCH_DATA_FILES}x{BENCH_DATA_MIB}"]
    return digest(*parts)


def output_dir(cache: Path, prof: Profile, key_: str) -> Path:
    return cache / "rootfs" / f"{prof.name}-{key_}"


def log_path(cache: Path, prof: Profile, key_: str) -> Path:
    return cache / "logs" / f"rootfs-{prof.name}-{key_}.log"


def build_tree(prof: Profile, cache: Path, report: Reporter = stderr_reporter,
               force: bool = False) -> Path:
    """Build (or find) the rootfs tree of a profile; return its path."""
    k = key(prof)
    final = output_dir(cache, prof, k) / "tree"
    ctx = StepContext("rootfs", log_path(cache, prof, k), report)
    if final.is_dir() and not force:
        ctx.say(f"{prof.name} tree up to date ({final})")
        return final
    ctx.log.parent.mkdir(parents=True, exist_ok=True)
    ctx.log.write_text(f"vmctl rootfs {prof.name} {k}\n")
    require_packages(ctx, prof.host_packages)
    ctx.say(f"assembling the {prof.name} tree (log: {ctx.log})")
    with atomic_output(final, is_dir=True) as tmp:
        if prof.name == "busybox":
            populate_busybox(tmp, ctx)
        else:
            base = _debootstrapped(prof, cache, ctx, force)
            ctx.say(f"copying the {prof.name} base tree and installing /init")
            shutil.rmtree(tmp, ignore_errors=True)
            ctx.run(["cp", "-a", "--reflink=auto", base, tmp], "copy the base tree")
            install_init(tmp)
    return final


def _debootstrapped(prof: Profile, cache: Path, ctx: StepContext, force: bool) -> Path:
    """The profile's tree without vmctl's /init, built once per base_key."""
    base = cache / "rootfs" / f"{prof.name}-base-{base_key(prof)}" / "tree"
    if base.is_dir() and not force:
        return base
    with atomic_output(base, is_dir=True) as tmp:
        populate_debian(tmp, ctx, _include(prof))
        if prof.name == "bench":
            populate_bench_data(tmp, ctx)
    return base


def _include(prof: Profile) -> tuple[str, ...]:
    return BENCH_INCLUDE if prof.name == "bench" else DEBIAN_INCLUDE


# --- busybox profile ---

BUSYBOX_DIRS = {"bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755,
                "usr/sbin": 0o755, "etc": 0o755, "dev": 0o755, "proc": 0o555,
                "sys": 0o555, "tmp": 0o1777, "run": 0o755, "root": 0o700, "home": 0o755,
                "mnt": 0o755, "var": 0o755, "var/log": 0o755, "var/tmp": 0o1777}

BUSYBOX_ETC = {
    "passwd": "root:x:0:0:root:/root:/bin/sh\n"
              "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    # root has no password (locked): the console shell needs none, ssh uses keys
    "shadow": "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n",
    "hostname": "vmctl\n",
    "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    "profile": "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
               "PS1='\\h:\\w\\$ '\n",
    "os-release": 'NAME="vmctl busybox"\nID=vmctl-busybox\nPRETTY_NAME="vmctl busybox rootfs"\n',
}


# the binary itself, and busybox's own init entry points (ours is /init)
_NOT_APPLETS = {"bin/busybox", "linuxrc", "sbin/init"}


def busybox_binary() -> Path:
    """The static busybox the busybox-static package installed."""
    listing = subprocess.run(["dpkg", "-L", BUSYBOX_PACKAGE], capture_output=True,
                             text=True, check=False).stdout.split()
    for path in listing:
        if re.fullmatch(r"(/usr)?/bin/busybox", path) and Path(path).is_file():
            return Path(path)
    return Path("/bin/busybox")


def populate_busybox(root: Path, ctx: StepContext) -> None:
    for rel, mode in BUSYBOX_DIRS.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        os.chmod(root / rel, mode)
    binary = busybox_binary()
    shutil.copyfile(binary, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    applets = subprocess.run([binary, "--list-full"], capture_output=True, text=True,
                             check=False).stdout.split()
    if not applets:
        raise ctx.fail(f"{binary} --list-full listed no applets")
    ctx.note(f"busybox {binary}: {len(applets)} applets")
    for rel in applets:
        link = root / rel
        if rel in _NOT_APPLETS or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        # absolute, so the link is right both as / of a VM and as a container rootfs
        link.symlink_to("/bin/busybox")
    for name, text in BUSYBOX_ETC.items():
        (root / "etc" / name).write_text(text)
    os.chmod(root / "etc/shadow", 0o640)
    install_init(root)
    _fix_mtimes(root)


def install_init(root: Path) -> None:
    """vmctl's /init, and /sbin/init pointing at it (what the kernel tries by default)."""
    shutil.copyfile(INIT_SCRIPT, root / "init")
    os.chmod(root / "init", 0o755)
    sbin_init = root / "sbin/init"
    if sbin_init.exists() or sbin_init.is_symlink():
        sbin_init.unlink()
    sbin_init.parent.mkdir(parents=True, exist_ok=True)
    sbin_init.symlink_to("/init")


def _fix_mtimes(root: Path) -> None:
    """Same mtimes on every build, so packed images differ only when content does."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))


# --- debian profile ---

def apt_mirror(apt_dir: Path = Path("/etc/apt")) -> str | None:
    """The Debian mirror apt itself uses for the main suite (one-line or deb822 sources);
    None when apt has none (debootstrap then uses its own default)."""
    for uri, suites in _apt_sources(apt_dir):
        if DEBIAN_SUITE in suites and "security" not in uri:
            return uri.rstrip("/")
    return None


def _apt_sources(apt_dir: Path) -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(parts.iterdir())
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.name.endswith(".list"):
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    found.append((words[1], [words[2]]))
        elif path.name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields = _deb822(stanza)
                if "deb" in fields.get("types", "").split() and \
                        fields.get("enabled", "yes") != "no":
                    for uri in fields.get("uris", "").split():
                        found.append((uri, fields.get("suites", "").split()))
    return found


def _deb822(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        name, value = line.split(":", 1)
        fields[name.strip().lower()] = value.strip()
    return fields


def populate_debian(root: Path, ctx: StepContext, include: tuple[str, ...] = DEBIAN_INCLUDE) -> None:
    if os.geteuid() != 0:
        raise ctx.fail("debootstrap needs root")
    mirror = apt_mirror()
    ctx.say(f"debootstrap {DEBIAN_SUITE} from {mirror or 'its default mirror'} (minutes)")
    try:
        ctx.run(["debootstrap", "--variant=minbase", f"--include={','.join(include)}",
                 DEBIAN_SUITE, root, *([mirror] if mirror else [])], "debootstrap")
    except BaseException:
        inner = root / "debootstrap" / "debootstrap.log"
        if inner.is_file():  # its own log says which package failed: keep it in ours
            ctx.note("--- debootstrap/debootstrap.log ---\n" + inner.read_text(errors="replace"))
        raise
    # smaller image; per-VM ssh host keys are made by /init at first boot
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*",
                    "etc/ssh/ssh_host_*"):
        for path in root.glob(pattern):
            path.unlink()
    (root / "etc/hostname").write_text("vmctl\n")
    for rel in ("dev", "proc", "sys", "run", "tmp"):
        (root / rel).mkdir(exist_ok=True)
    ctx.note("debian tree done")


def populate_bench_data(root: Path, ctx: StepContext) -> None:
    """Incompressible files every instance of the page-cache suite reads: random bytes, so
    neither KSM nor a compressed layer can make them look smaller than they are."""
    folder = root / BENCH_DATA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    size = (BENCH_DATA_MIB // BENCH_DATA_FILES) << 20
    for index in range(BENCH_DATA_FILES):
        with open(folder / f"shared-{index}.bin", "wb") as out:
            for _ in range(size >> 20):
                out.write(os.urandom(1 << 20))
    ctx.note(f"bench data: {BENCH_DATA_FILES} files, {BENCH_DATA_MIB} MiB in /{BENCH_DATA_DIR}")


def tree_size(root: Path) -> int:
    """Bytes the tree needs on a 4 KiB-block file system (a rough upper bound)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        total += 4096
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += -(-st.st_size // 4096) * 4096 + 256
            else:
                total += 256  # inode; small symlinks live in it
    return total
