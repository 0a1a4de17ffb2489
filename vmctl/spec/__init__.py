"""The YAML machine spec: parsing with positions, validation, defaults."""

from .model import DiskSpec, MachineSpec, NetworkSpec, SpecFile, SshSpec
from .parse import load_spec, parse_spec

__all__ = ["DiskSpec", "MachineSpec", "NetworkSpec", "SshSpec", "SpecFile", "load_spec", "parse_spec"]
