"""python -m vmctl.nested [options] -- CMD...: run CMD inside the nested host (a test harness).

Prints the command's stdout and stderr and exits with its exit code; 125 when the nested
host itself failed (console tail on stderr). `--detect` prints how the linux test tier
would run here and exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Sequence

from .. import signals
from ..errors import VmctlError
from .detect import plan_linux_tier
from .l1_host import NestedHost, NestedHostError

HARNESS_FAILED = 125


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vmctl.nested",
        description="Run a command inside the nested KVM host: an L1 Linux under QEMU TCG with "
        "emulated AMD-V that sees this machine's files. A test harness, not a VM manager.",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for boot + command (default 600)")
    parser.add_argument("--memory", type=int, default=4096, help="L1 memory in MiB (default 4096)")
    parser.add_argument("--cpus", type=int, default=2, help="L1 vCPUs (default 2)")
    parser.add_argument("--cwd", type=Path, help="working directory inside L1 (default: the current one)")
    parser.add_argument(
        "--share", type=Path, action="append", default=[],
        help="host directory L1 writes through to, at the same path (repeatable); "
        "all other writes inside L1 are discarded at power-off",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run's temp dir (console log, initramfs)")
    parser.add_argument("--console", action="store_true", help="print L1's console log to stderr afterwards")
    parser.add_argument("--detect", action="store_true", help="print how the linux test tier would run here")
    parser.add_argument("command", nargs="*", help="the command (after --)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """SIGINT, SIGTERM and SIGHUP unwind through NestedHost.run's clean-up (QEMU killed, temp
    dir removed); the command's output so far is printed, never a traceback."""
    signals.install()
    try:
        return _main(argv)
    except KeyboardInterrupt as interrupt:
        _write(*getattr(interrupt, "partial", ("", "")))
        print(f"python -m vmctl.nested: interrupted ({signal.Signals(signals.exit_status(interrupt) - 128).name}); "
              "QEMU killed", file=sys.stderr)
        return signals.exit_status(interrupt)
    except BrokenPipeError:
        return 128 + signal.SIGPIPE


def _write(stdout: str, stderr: str) -> None:
    sys.stdout.write(stdout)
    sys.stdout.flush()
    sys.stderr.write(stderr)
    sys.stderr.flush()


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.detect:
        plan = plan_linux_tier()
        print(f"{plan.mode}: {plan.reason}")
        return 0
    if not args.command:
        print("python -m vmctl.nested: error: no command (usage: python -m vmctl.nested -- CMD...)", file=sys.stderr)
        return 2
    host = NestedHost(memory_mib=args.memory, cpus=args.cpus, shares=args.share, keep_dir=args.keep)
    try:
        result = host.run(args.command, cwd=args.cwd, timeout=args.timeout)
    except NestedHostError as error:
        _write(*error.partial)
        if error.console_tail:
            print(error.console_tail, file=sys.stderr)
        print(f"python -m vmctl.nested: error: {error}", file=sys.stderr)
        return HARNESS_FAILED
    except VmctlError as error:
        print(f"python -m vmctl.nested: error: {error}", file=sys.stderr)
        return HARNESS_FAILED
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.write(result.stderr)
    if args.console:
        sys.stderr.write(result.console_log)
    print(
        f"[nested] exit {result.exit_code}; L1 boot {result.boot_seconds:.1f} s, "
        f"command {result.command_seconds:.1f} s, total {result.total_seconds:.1f} s",
        file=sys.stderr,
    )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
