"""Snapshots of native VMs: the file format (snapshot_file.py), named snapshots (snapshot_store.py), disk layers (disk_layers.py) and CPU compatibility (cpu_check.py)."""
