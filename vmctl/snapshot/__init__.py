"""Snapshots of native VMs: the file format (format.py) and CPU compatibility (cpu_check.py)."""
