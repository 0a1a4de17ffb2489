"""Sharing host folders: a FUSE-protocol file server in Python (`server.FileServer`), served
to the host kernel through /dev/fuse (`hostmount`) or to a guest through virtio-fs."""
