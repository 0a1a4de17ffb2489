"""virtio devices for the native VMM: split virtqueues, the virtio-mmio transport, a worker
thread per device, and the device models (blk, rng, net, console)."""
