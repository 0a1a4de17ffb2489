"""The files in one machine's folder, shared by the state store, the backends and the VMM:

    <folder>/machine.json   the machine record (vmctl.state: name, backend, typed plan, pid...)
    <folder>/vmm-plan.json  the native VMM's input (vmctl.plans.KvmPlan), given to it as an argument
    <folder>/control.sock   the VMM's control socket (JSON lines)
    <folder>/console.log    the guest console
    <folder>/console.sock   the live console (`vmctl console`)
    <folder>/network.json   the machine's TAP and addresses (written by the VMM or monitor)
    <folder>/ssh/           the machine's own SSH key pair
    <folder>/outcome.json   how it ended (written by the VMM or monitor on exit)
    <folder>/disks/         per-machine overlays
    <folder>/vmm.log        the VMM's own log
    <folder>/agent-transport.json  libvirt: the port the guest agent answered on (in which QEMU process)
"""

from __future__ import annotations

RECORD = "machine.json"
VMM_PLAN = "vmm-plan.json"
OUTCOME = "outcome.json"
CONSOLE = "console.log"
CONTROL = "control.sock"
CONSOLE_SOCKET = "console.sock"
NETWORK = "network.json"
VMM_LOG = "vmm.log"
AGENT_TRANSPORT = "agent-transport.json"
DISKS = "disks"
