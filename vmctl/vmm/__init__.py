"""The native VMM: build a KVM machine from a config, run its vCPUs, report how it ended."""
