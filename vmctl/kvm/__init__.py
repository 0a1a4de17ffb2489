"""KVM bindings: the ABI (abi.py) and thin typed wrappers over the /dev/kvm, VM and vCPU fds."""
