"""The libvirt backend (docs/libvirt.md): machine specs run as libvirt domains."""

from .backend import LibvirtBackend
from .domain_xml import DiskLayer, DiskPlan, DomainPlan, NicPlan, render

__all__ = ["DiskLayer", "DiskPlan", "DomainPlan", "LibvirtBackend", "NicPlan", "render"]
