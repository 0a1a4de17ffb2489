"""Emulated devices and the buses that route guest port I/O and MMIO to them."""
