"""x86-64 machine setup: GDT, page tables, MP table, CPUID, MSRs, LAPIC and entry registers."""
