"""virtio benchmark (python -m vmctl.virtio.bench) and its guest-side helper vbench.c."""
