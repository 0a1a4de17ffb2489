"""Run inside L1 for its whole life: keep KVM's static keys switched on.

KVM flips a few static keys when the first VM or vCPU of a kind comes or the last one goes:
the scheduler's preempt notifiers (per VM), `apic_sw_disabled` (a vCPU with an in-kernel
LAPIC that is not enabled yet) and `kvm_has_noapic_vcpu` (a vCPU without one). Each flip
rewrites kernel text with int3 breakpoints and IPIs (text_poke_bp). Under QEMU 7.2 TCG that
sometimes livelocks L1: caught with the monitor, both vCPUs looped through exc_int3 at the
static branch in __schedule with interrupts off and the LAPIC timer pending, forever.
Every test boots and destroys VMs, so every test flipped those keys.

Holding one VM of each kind open (never run) keeps the counts above zero: the keys flip once,
here, while L1 is quiet, and never again. `python -m vmctl.nested.pin READY_FILE` writes
READY_FILE once the VMs exist, then sleeps until L1 powers off.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..kvm.system import Kvm
from ..kvm.vm import VmFd


def hold_static_keys() -> list[object]:
    """The objects to keep alive: a VM with an irqchip and one without, one vCPU each."""
    kvm = Kvm()
    with_lapic = VmFd(kvm)
    with_lapic.create_irqchip()
    without_lapic = VmFd(kvm)
    vcpus = [with_lapic.create_vcpu_fd(0), without_lapic.create_vcpu_fd(0)]
    return [kvm, with_lapic, without_lapic, vcpus]


def main(argv: list[str]) -> int:
    held = hold_static_keys()
    Path(argv[0]).write_text("ready\n")
    while held:
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
