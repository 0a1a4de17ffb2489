"""Machine size limits every backend and the YAML parser share."""

from __future__ import annotations

# vCPUs per machine: what the VMM's MP table and CPUID topology are built and tested for.
MAX_CPUS = 32
# Smallest RAM vmctl accepts: room for the boot structures, a kernel and its page tables.
MIN_MEMORY = 16 << 20
