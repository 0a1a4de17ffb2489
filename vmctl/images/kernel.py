"""Recipe: the reference guest kernel, built from Debian's linux-source-6.1.

tinyconfig + the microVM fragment in data/microvm.config, built out of tree in the cache.
The extracted source and the build tree are kept per source version, so a changed fragment
is an incremental rebuild; the outputs (vmlinux, bzImage, config, System.map) go to a
directory named by a hash of the fragment, this recipe's version and the source version.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .steps import Reporter, StepContext, atomic_output, digest, dpkg_version, require_packages, stderr_reporter

RECIPE_VERSION = "kernel-1"  # bump when the steps below change what they produce
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUILD_PACKAGES = (SOURCE_PACKAGE, "make", "gcc", "flex", "bison", "bc", "libelf-dev",
                  "libssl-dev", "xz-utils")
FRAGMENT = Path(__file__).parent / "data" / "microvm.config"
OUTPUTS = {  # name in the cache -> path in the build tree
    "vmlinux": "vmlinux",
    "bzImage": "arch/x86/boot/bzImage",
    "config": ".config",
    "System.map": "System.map",
}

_SET = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


@dataclass(frozen=True)
class KernelInputs:
    source_version: str  # "missing" when the package is not installed
    fragment: bytes

    @property
    def key(self) -> str:
        return digest(RECIPE_VERSION, self.source_version, self.fragment)


def inputs(fragment: Path = FRAGMENT) -> KernelInputs:
    return KernelInputs(dpkg_version(SOURCE_PACKAGE) or "missing", fragment.read_bytes())


def output_dir(cache: Path, key: str) -> Path:
    return cache / "kernel" / key


def log_path(cache: Path, key: str) -> Path:
    return cache / "logs" / f"kernel-{key}.log"


def fragment_symbols(text: str) -> tuple[dict[str, str], set[str]]:
    """(symbols the fragment sets, with values; symbols it wants unset)."""
    wanted: dict[str, str] = {}
    unwanted: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if m := _SET.match(line):
            wanted[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            unwanted.add(m.group(1))
    return wanted, unwanted


def config_problems(fragment: str, config: str) -> list[str]:
    """What the final .config lacks of the fragment: ["CONFIG_X (wanted y, got unset)", ...]."""
    have, _ = fragment_symbols(config)
    wanted, unwanted = fragment_symbols(fragment)
    problems = [f"{sym} (wanted {val}, got {have.get(sym, 'unset')})"
                for sym, val in wanted.items() if have.get(sym) != val]
    problems += [f"{sym} (wanted unset, got {have[sym]})"
                 for sym in sorted(unwanted) if have.get(sym, "n") != "n"]
    return problems


def build(cache: Path, report: Reporter = stderr_reporter, force: bool = False,
          jobs: int | None = None, fragment: Path = FRAGMENT) -> Path:
    """Build (or find) the kernel; return the output directory."""
    kin = inputs(fragment)
    final = output_dir(cache, kin.key)
    ctx = StepContext("kernel", log_path(cache, kin.key), report)
    if final.is_dir() and not force:
        ctx.say(f"up to date ({final})")
        return final
    ctx.log.parent.mkdir(parents=True, exist_ok=True)
    ctx.log.write_text(f"vmctl kernel build {kin.key}\n")
    versions = require_packages(ctx, BUILD_PACKAGES)
    version = versions[SOURCE_PACKAGE]
    source = _extract(cache, version, ctx)
    work = cache / "kernel" / "work" / version
    work.mkdir(parents=True, exist_ok=True)
    with open(work.parent / f"{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per tree at a time
        _configure(source, work, fragment, ctx)
        jobs = jobs or os.cpu_count() or 1
        ctx.say(f"compiling with {jobs} jobs (log: {ctx.log})")
        started = time.monotonic()
        ctx.run(["make", "-C", source, f"O={work}", "ARCH=x86_64", f"-j{jobs}",
                 "vmlinux", "bzImage"], "compile", cwd=work)
        ctx.note(f"compiled in {time.monotonic() - started:.0f} s")
        with atomic_output(final, is_dir=True) as tmp:
            for name, rel in OUTPUTS.items():
                shutil.copy2(work / rel, tmp / name)
    ctx.say(f"done ({final})")
    return final


def _extract(cache: Path, version: str, ctx: StepContext) -> Path:
    """The unpacked source tree for this package version (unpacked once)."""
    final = cache / "kernel" / "src" / version
    tree = final / SOURCE_PACKAGE
    if tree.is_dir():
        return tree
    if not SOURCE_TARBALL.is_file():
        raise ctx.fail(f"{SOURCE_TARBALL} is missing (reinstall {SOURCE_PACKAGE})")
    ctx.say(f"unpacking {SOURCE_PACKAGE} {version}")
    with atomic_output(final, is_dir=True) as tmp:
        ctx.run(["tar", "-C", tmp, "-xf", SOURCE_TARBALL], "unpack source")
    return tree


def _configure(source: Path, work: Path, fragment: Path, ctx: StepContext) -> None:
    ctx.say("configuring (tinyconfig + microvm.config)")
    make: list[str | Path] = ["make", "-C", source, f"O={work}", "ARCH=x86_64"]
    ctx.run(make + ["tinyconfig"], "configure: tinyconfig", cwd=work)
    ctx.run([source / "scripts/kconfig/merge_config.sh", "-m", "-O", work,
             work / ".config", fragment], "configure: merge fragment", cwd=work)
    ctx.run(make + ["olddefconfig"], "configure: olddefconfig", cwd=work)
    problems = config_problems(fragment.read_text(), (work / ".config").read_text())
    if problems:
        ctx.note("symbols the kernel config lacks:\n  " + "\n  ".join(problems))
        raise ctx.fail(f"configure: {len(problems)} required symbol(s) missing, first "
                       f"{problems[0]}")
