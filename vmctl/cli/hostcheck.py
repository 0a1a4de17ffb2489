"""`vmctl host-check`: is /dev/kvm usable, hardware-backed or paravirtual, and what it offers."""

from __future__ import annotations

import argparse
import json

from ..host_probe import check_host, describe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "host-check",
        help="report what this host's /dev/kvm can do",
        description="Check /dev/kvm: present and permitted, hardware-backed (kvm_intel/kvm_amd) "
        "or paravirtual (kvm_pvm, which cannot boot a stock Linux kernel), and the KVM "
        "capabilities vmctl relies on. Exits 0 when the native VMM can run here.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = check_host()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print("\n".join(describe(report)))
    return 0 if report.usable else 1
