"""Can this host run a vCPU saved elsewhere? Its CPUID features must all be supported here.

A restored guest keeps using every instruction set extension it detected at boot; if the
host's KVM cannot offer one of them, the guest would fault on it at some random later point.
So restore compares the saved vCPU's feature leaves with KVM_GET_SUPPORTED_CPUID and
refuses, naming the missing features, instead.
"""

from __future__ import annotations

from ..kvm.abi import KvmCpuidEntry2

# (leaf, subleaf, register) holding feature flags.
FEATURE_REGISTERS = [
    (0x1, 0, "ecx"), (0x1, 0, "edx"), (0x7, 0, "ebx"), (0x7, 0, "ecx"), (0x7, 0, "edx"),
    (0xD, 1, "eax"), (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"),
]
# Bits that are not capabilities: set by vmctl itself, or mirroring the guest's control
# registers (OSXSAVE follows CR4.OSXSAVE, OSPKE CR4.PKE).
NOT_FEATURES = {
    (0x1, 0, "ecx"): (1 << 31) | (1 << 27),  # hypervisor, osxsave
    (0x1, 0, "edx"): 1 << 28,  # htt (topology, set per VM)
    (0x7, 0, "ecx"): 1 << 4,  # ospke
}
NAMES = {
    (0x1, "ecx"): {0: "sse3", 1: "pclmulqdq", 9: "ssse3", 12: "fma", 13: "cx16", 19: "sse4_1", 20: "sse4_2",
                   21: "x2apic", 22: "movbe", 23: "popcnt", 24: "tsc_deadline", 25: "aes", 26: "xsave",
                   28: "avx", 29: "f16c", 30: "rdrand"},
    (0x1, "edx"): {0: "fpu", 4: "tsc", 5: "msr", 9: "apic", 15: "cmov", 23: "mmx", 25: "sse", 26: "sse2"},
    (0x7, "ebx"): {0: "fsgsbase", 3: "bmi1", 5: "avx2", 8: "bmi2", 9: "erms", 16: "avx512f", 17: "avx512dq",
                   18: "rdseed", 19: "adx", 20: "smap", 23: "clflushopt", 29: "sha", 30: "avx512bw", 31: "avx512vl"},
    (0x7, "ecx"): {1: "avx512vbmi", 8: "gfni", 9: "vaes", 10: "vpclmulqdq", 22: "rdpid"},
    (0x7, "edx"): {4: "fsrm", 24: "amx_tile"},
    (0xD, "eax"): {0: "xsaveopt", 1: "xsavec", 3: "xsaves"},
    (0x80000001, "ecx"): {0: "lahf_lm", 5: "abm", 6: "sse4a", 8: "3dnowprefetch"},
    (0x80000001, "edx"): {11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp", 29: "lm"},
}


def _entry(entries: list[KvmCpuidEntry2], leaf: int, subleaf: int) -> KvmCpuidEntry2 | None:
    for entry in entries:
        if entry.function == leaf and (entry.index == subleaf or subleaf == 0 and leaf not in (0x7, 0xD)):
            return entry
    return None


def vendor(entries: list[KvmCpuidEntry2]) -> str:
    entry = _entry(entries, 0, 0)
    if entry is None:
        return "unknown"
    return b"".join(value.to_bytes(4, "little") for value in (entry.ebx, entry.edx, entry.ecx)).decode("ascii", "replace")


def missing_features(saved: list[KvmCpuidEntry2], supported: list[KvmCpuidEntry2]) -> list[str]:
    """Names of the saved vCPU's features this host cannot offer ([] when it can run it)."""
    missing: list[str] = []
    if vendor(saved) != vendor(supported):
        missing.append(f"vendor {vendor(saved)} (this host: {vendor(supported)})")
    for leaf, subleaf, register in FEATURE_REGISTERS:
        want = _entry(saved, leaf, subleaf)
        if want is None:
            continue
        have = _entry(supported, leaf, subleaf)
        bits = getattr(want, register) & ~(getattr(have, register) if have else 0)
        bits &= ~NOT_FEATURES.get((leaf, subleaf, register), 0)
        for bit in range(32):
            if bits & (1 << bit):
                name = NAMES.get((leaf, register), {}).get(bit)
                missing.append(name or f"cpuid 0x{leaf:x}.{subleaf} {register} bit {bit}")
    return missing
