"""Peers vmctl is measured and checked against (QEMU), driven the same way as vmctl."""
