"""The Linux x86-64 boot protocol: kernel images, zero page, e820, MP table, entry CPU state."""
