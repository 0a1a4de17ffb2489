"""vmctl: declarative virtual machines over Linux KVM."""

__version__ = "0.1.0"
