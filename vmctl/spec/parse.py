"""Read a spec from YAML (or a dict) into `SpecFile`, with errors that point at file:line:column.

The YAML is composed into nodes (not plain data) so that every value keeps its position;
each key is checked against the fields it may be, and an unknown key suggests the nearest
valid one.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from ..errors import VmctlError
from ..fs.cache import DEFAULT as CACHE_DEFAULT
from ..fs.cache import MODES as CACHE_MODES
from ..limits import MAX_CPUS, MIN_MEMORY
from ..units import parse_size
from .model import (
    BACKENDS,
    IMAGE_PROFILES,
    LIBVIRT_DOMAIN_TYPES,
    NETWORK_MODES,
    DiskSpec,
    LibvirtSpec,
    MachineSpec,
    MountSpec,
    NetworkSpec,
    PmemSpec,
    PortForward,
    ProbeSpec,
    ProvisionSpec,
    SpecFile,
    SshSpec,
)

MAX_DISK = 64 << 40  # qemu-img's limit for qcow2 is 64 TiB too
USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
FORWARD = re.compile(r"^(\d+):(\d+)(?:/(tcp|udp))?$")


class SpecError(VmctlError):
    pass


class _Context:
    def __init__(self, source: str, base_dir: Path | None) -> None:
        self.source = source
        self.base_dir = base_dir

    def error(self, node: yaml.Node, where: str, message: str) -> SpecError:
        mark = node.start_mark
        return SpecError(f"{self.source}:{mark.line + 1}:{mark.column + 1}: {where}: {message}")

    def path(self, node: yaml.Node, where: str, must_exist: bool = True) -> Path:
        text = self.scalar(node, where, str)
        path = Path(text).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        if must_exist and not path.exists():
            raise self.error(node, where, f"{text}: no such file")
        return path

    def scalar(self, node: yaml.Node, where: str, kind: type) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, where, f"expected a {_kind_name(kind)}, got a {_node_name(node)}")
        try:
            value = yaml.safe_load(yaml.serialize(node)) if node.tag != "tag:yaml.org,2002:str" else node.value
        except (yaml.YAMLError, ValueError, TypeError, OverflowError):  # e.g. "!!int x" (fuzzing)
            raise self.error(node, where, f"cannot read {node.value!r} as a {_kind_name(kind)}") from None
        if kind is str:
            if value is None or isinstance(value, (list, dict)):
                raise self.error(node, where, "expected a string")
            return str(value)
        if kind is bool and not isinstance(value, bool):
            raise self.error(node, where, f"expected true or false, got {node.value!r}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.error(node, where, f"expected an integer, got {node.value!r}")
        return value

    def mapping(self, node: yaml.Node, where: str, fields: dict[str, Callable]) -> dict[str, Any]:
        """Apply `fields[key](value_node, where.key)` to each key; unknown keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, where, f"expected a mapping, got a {_node_name(node)}")
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, where, str)
            inner = f"{where}.{key}" if where else key
            if key not in fields:
                hint = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (valid keys: {', '.join(sorted(fields))})"
                raise self.error(key_node, inner, f"unknown key{suggestion}")
            if key in result:
                raise self.error(key_node, inner, "key given twice")
            result[key] = fields[key](value_node, inner)
        return result

    def sequence(self, node: yaml.Node, where: str, item: Callable) -> list[Any]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, where, f"expected a list, got a {_node_name(node)}")
        return [item(child, f"{where}[{index}]") for index, child in enumerate(node.value)]


def _kind_name(kind: type) -> str:
    return {str: "string", int: "integer", bool: "boolean"}.get(kind, kind.__name__)


def _node_name(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return f"value {node.value!r}"


def load_spec(path: Path | str) -> SpecFile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise VmctlError(f"{path}: cannot read spec: {error.strerror}") from None
    return parse_spec(text, source=str(path), base_dir=path.parent)


def parse_spec(document: str | dict, source: str = "<spec>", base_dir: Path | None = None) -> SpecFile:
    """Parse YAML text, or a dict with the same structure (as the pytest fixture passes)."""
    text = yaml.safe_dump(document, sort_keys=False) if isinstance(document, dict) else document
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        position = f"{mark.line + 1}:{mark.column + 1}" if mark else "?"
        raise SpecError(f"{source}:{position}: invalid YAML: {error.problem}") from None
    except yaml.reader.ReaderError as error:  # a control character: found by fuzzing
        raise SpecError(f"{source}: invalid YAML: character #x{error.character:04x} at byte "
                        f"{error.position} is not allowed") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{source}: invalid YAML: {' '.join(str(error).split())}") from None
    if root is None:
        raise SpecError(f"{source}: empty spec: declare `machines:`")
    context = _Context(source, base_dir)
    if isinstance(root, yaml.MappingNode) and not any(k.value == "machines" for k, _ in root.value):
        # A single machine at the top level (handy for dicts and one-machine files).
        return SpecFile(Path(source) if base_dir else None, (_machine(context, root, "", None),))
    top = context.mapping(root, "", {
        "machines": lambda node, where: node,
        "defaults": lambda node, where: node,
    })
    if "machines" not in top:
        raise context.error(root, "machines", "missing: declare at least one machine")
    machines_node = top["machines"]
    if not isinstance(machines_node, yaml.MappingNode) or not machines_node.value:
        raise context.error(machines_node, "machines", "expected a mapping of machine name -> settings")
    defaults = top.get("defaults")
    machines = [
        _machine(context, value, f"machines.{key.value}", key, defaults) for key, value in machines_node.value
    ]
    seen: set[str] = set()
    for key, _ in machines_node.value:  # the second mention is the mistake
        if key.value in seen:
            raise context.error(key, f"machines.{key.value}", "machine name given twice")
        seen.add(key.value)
    return SpecFile(Path(source) if base_dir else None, tuple(machines))


def _machine(context: _Context, node: yaml.Node, where: str, name_node: yaml.Node | None, defaults: yaml.Node | None = None) -> MachineSpec:
    fields = _machine_fields(context)
    values: dict[str, Any] = {}
    if defaults is not None:
        values.update(context.mapping(defaults, "defaults", {k: v for k, v in fields.items() if k != "name"}))
    values.update(context.mapping(node, where, fields))
    if name_node is not None:
        if "name" in values:
            raise context.error(node, f"{where}.name", "the machine's name is its key under `machines`")
        values["name"] = _name(context, name_node, where)
    values.setdefault("name", "vm")
    values["source"] = f"{context.source}:{node.start_mark.line + 1}"
    both = {m.guest for m in values.get("mounts", ())} & {p.guest for p in values.get("pmem", ())}
    if both:
        raise context.error(node, f"{where}.pmem" if where else "pmem",
                            f"{sorted(both)[0]!r} is both a `mounts` and a `pmem` mount point")
    if values.get("backend") == "container":
        _check_container_fields(context, node, where, defaults)
    return MachineSpec(**values)


# Fields a container cannot honour (it shares the host's kernel, has no block devices and
# no port relay): errors at their own line and column, not silently ignored.
CONTAINER_UNSUPPORTED = ("kernel", "initrd", "cmdline", "disks", "pmem", "libvirt")


def _check_container_fields(c: _Context, node: yaml.Node, where: str, defaults: yaml.Node | None) -> None:
    for mapping, prefix in ((node, where), (defaults, "defaults")):
        if not isinstance(mapping, yaml.MappingNode):
            continue
        for key_node, value_node in mapping.value:
            key = key_node.value
            field = f"{prefix}.{key}" if prefix else key
            if key in CONTAINER_UNSUPPORTED:
                raise c.error(key_node, field, "not supported with backend: container (see docs/containers.md)")
            if key == "network" and isinstance(value_node, yaml.MappingNode):
                for sub_key, _ in value_node.value:
                    if sub_key.value == "forwards":
                        raise c.error(sub_key, f"{field}.forwards",
                                      "not supported with backend: container (see docs/containers.md)")


def _name(context: _Context, node: yaml.Node, where: str) -> str:
    name = context.scalar(node, where, str)
    if not NAME.match(name):
        raise context.error(node, where, f"machine name {name!r} must be lowercase letters, digits and '-' (max 63)")
    return name


def _machine_fields(c: _Context) -> dict[str, Callable]:
    def choice(what: str, choices: Sequence[str]) -> Callable:
        def parse(node, where):
            value = c.scalar(node, where, str)
            if value not in choices:
                hint = difflib.get_close_matches(value, choices, n=1)
                raise c.error(node, where, f"unknown {what} {value!r}" + (f" (did you mean {hint[0]!r}?)" if hint else f" (one of {', '.join(choices)})"))
            return value
        return parse

    backend = choice("backend", BACKENDS)

    def cpus(node, where):
        value = c.scalar(node, where, int)
        if not 1 <= value <= MAX_CPUS:
            raise c.error(node, where, f"{value} is out of range 1..{MAX_CPUS}")
        return value

    def memory(node, where):
        text = c.scalar(node, where, str)
        try:
            value = parse_size(text, where)
        except VmctlError as error:
            raise c.error(node, where, str(error).split(": ", 1)[1]) from None
        if value < MIN_MEMORY:
            raise c.error(node, where, f"{text} is below the minimum of 16M")
        if value > 1 << 40:
            raise c.error(node, where, f"{text} is more than 1 TiB")
        return value

    profile = choice("image", IMAGE_PROFILES)

    def image(node, where):
        value = c.scalar(node, where, str)
        if not value.startswith("oci:"):
            return profile(node, where)
        from ..oci.runconfig import parse_ref

        try:
            parse_ref(value)
        except VmctlError as error:
            raise c.error(node, where, str(error)) from None
        return value

    def command(node, where):
        if isinstance(node, yaml.ScalarNode):
            return ("/bin/sh", "-c", c.scalar(node, where, str))
        return tuple(c.sequence(node, where, lambda n, w: c.scalar(n, w, str)))

    def environment(node, where):
        if not isinstance(node, yaml.MappingNode):
            raise c.error(node, where, f"expected a mapping of NAME: value, got a {_node_name(node)}")
        result = {}
        for key_node, value_node in node.value:
            key = c.scalar(key_node, where, str)
            if not ENV_NAME.match(key):
                raise c.error(key_node, f"{where}.{key}", "not a valid environment variable name")
            result[key] = c.scalar(value_node, f"{where}.{key}", str)
        return result

    return {
        "name": lambda node, where: _name(c, node, where),
        "backend": backend,
        "cpus": cpus,
        "memory": memory,
        "image": image,
        "kernel": lambda node, where: c.path(node, where),
        "initrd": lambda node, where: c.path(node, where),
        "cmdline": lambda node, where: c.scalar(node, where, str),
        "disks": lambda node, where: tuple(c.sequence(node, where, lambda n, w: _disk(c, n, w))),
        "mounts": lambda node, where: _mounts(c, node, where),
        "pmem": lambda node, where: _pmem(c, node, where),
        "network": lambda node, where: _network(c, node, where),
        "ssh": lambda node, where: _ssh(c, node, where),
        "environment": environment,
        "command": command,
        "ready": lambda node, where: _probes(c, node, where),
        "provision": lambda node, where: _provision(c, node, where),
        "ephemeral": lambda node, where: c.scalar(node, where, bool),
        "memory_merge": lambda node, where: c.scalar(node, where, bool),
        "snapshot": lambda node, where: c.scalar(node, where, str),
        "libvirt": lambda node, where: _libvirt(c, node, where),
    }


def _disk(c: _Context, node: yaml.Node, where: str) -> DiskSpec:
    if isinstance(node, yaml.ScalarNode):  # shorthand: just the base image
        return DiskSpec(image=c.path(node, where))

    def size(n, w):
        text = c.scalar(n, w, str)
        try:
            return parse_size(text, w)
        except VmctlError as error:
            raise c.error(n, w, str(error).split(": ", 1)[1]) from None

    values = c.mapping(node, where, {
        "image": lambda n, w: c.path(n, w),
        "size": size,
        "read_only": lambda n, w: c.scalar(n, w, bool),
        "overlay": lambda n, w: c.scalar(n, w, bool),
    })
    if "image" not in values and "size" not in values:
        raise c.error(node, where, "give `image` (a base disk) or `size` (a new blank disk)")
    size_node = next((v for k, v in node.value if k.value == "size"), node)
    if values.get("size") is not None:
        if values["size"] % 512:
            raise c.error(size_node, f"{where}.size", "must be a multiple of 512 bytes")
        if not 0 < values["size"] <= MAX_DISK:
            raise c.error(size_node, f"{where}.size", "must be more than 0 and at most 64T")
        if values.get("image") is not None:
            _check_not_smaller(c, size_node, f"{where}.size", values["image"], values["size"])
    return DiskSpec(image=values.get("image"), size=values.get("size"), read_only=values.get("read_only", False), overlay=values.get("overlay", True))


def _mounts(c: _Context, node: yaml.Node, where: str) -> tuple[MountSpec, ...]:
    from .. import paths

    state = Path(paths.state_dir()).resolve()
    mounts: list[MountSpec] = []
    for index, item in enumerate(c.sequence(node, where, lambda n, w: n)):
        w = f"{where}[{index}]"
        values = c.mapping(item, w, {
            "host": lambda n, w: (n, c.path(n, w, must_exist=False)),
            "guest": lambda n, w: (n, c.scalar(n, w, str)),
            "read_only": lambda n, w: c.scalar(n, w, bool),
            "cache": lambda n, w: _cache_mode(c, n, w),
        })
        for key in ("host", "guest"):
            if key not in values:
                raise c.error(item, f"{w}.{key}", "missing: give `host` (a folder) and `guest` (an absolute path)")
        host_node, host = values["host"]
        guest_node, guest = values["guest"]
        if not host.exists():
            raise c.error(host_node, f"{w}.host", f"{host}: no such directory")
        if not host.is_dir():
            raise c.error(host_node, f"{w}.host", f"{host}: not a directory")
        host = host.resolve()
        if host == state or state in host.parents or host in state.parents:
            raise c.error(host_node, f"{w}.host", f"{host} overlaps vmctl's state folder {state}")
        guest = _guest_mount_point(c, guest_node, f"{w}.guest", guest, [m.guest for m in mounts])
        mounts.append(MountSpec(host, guest, values.get("read_only", False), values.get("cache", CACHE_DEFAULT)))
    return tuple(mounts)


def _cache_mode(c: _Context, node: yaml.Node, where: str) -> str:
    value = c.scalar(node, where, str)
    if value not in CACHE_MODES:
        raise c.error(node, where, f"unknown cache mode {value!r} (one of {', '.join(CACHE_MODES)})")
    return value


def _guest_mount_point(c: _Context, node: yaml.Node, where: str, guest: str, taken: list[str]) -> str:
    if not guest.startswith("/") or "\0" in guest or any(part in (".", "..") for part in guest.split("/")):
        raise c.error(node, where, f"{guest!r} is not an absolute path without . or ..")
    if guest.rstrip("/") in ("", "/proc", "/sys", "/dev", "/dev/pts", "/run", "/tmp"):
        raise c.error(node, where, f"{guest!r} is a system mount of the guest")
    if guest.rstrip("/") in taken:
        raise c.error(node, where, f"{guest!r} is mounted twice")
    return guest.rstrip("/")


def _pmem(c: _Context, node: yaml.Node, where: str) -> tuple[PmemSpec, ...]:
    """`pmem:` entries: {image: raw ext4, guest: mount point[, read_only: true]}."""
    from ..disk.ext4_super import check_dax_base

    bases: list[PmemSpec] = []
    for index, item in enumerate(c.sequence(node, where, lambda n, w: n)):
        w = f"{where}[{index}]"
        values = c.mapping(item, w, {
            "image": lambda n, w: (n, c.path(n, w, must_exist=False)),
            "guest": lambda n, w: (n, c.scalar(n, w, str)),
            "read_only": lambda n, w: (n, c.scalar(n, w, bool)),
        })
        for key in ("image", "guest"):
            if key not in values:
                raise c.error(item, f"{w}.{key}", "missing: give `image` (a raw ext4) and `guest` (a mount point)")
        if "read_only" in values and not values["read_only"][1]:
            raise c.error(values["read_only"][0], f"{w}.read_only",
                          "pmem bases are read-only (shared by every guest): use `disks` for a writable disk")
        image_node, image = values["image"]
        try:
            check_dax_base(image)
        except VmctlError as error:
            raise c.error(image_node, f"{w}.image", str(error)) from None
        guest_node, guest = values["guest"]
        guest = _guest_mount_point(c, guest_node, f"{w}.guest", guest, [b.guest for b in bases])
        bases.append(PmemSpec(image.resolve(), guest))
    return tuple(bases)


PROBE_KINDS = ("log", "tcp", "http", "command")


def _probes(c: _Context, node: yaml.Node, where: str) -> tuple[ProbeSpec, ...]:
    probes = []
    for index, item in enumerate(c.sequence(node, where, lambda n, w: n)):
        w = f"{where}[{index}]"
        values = c.mapping(item, w, {
            "log": lambda n, w: (n, c.scalar(n, w, str)),
            "tcp": lambda n, w: (n, c.scalar(n, w, int)),
            "http": lambda n, w: (n, c.scalar(n, w, str)),
            "command": lambda n, w: (n, c.scalar(n, w, str)),
            "status": lambda n, w: (n, c.scalar(n, w, int)),
            "timeout": lambda n, w: (n, c.scalar(n, w, str)),
            "hint": lambda n, w: (n, c.scalar(n, w, str)),
        })
        kinds = [k for k in PROBE_KINDS if k in values]
        if len(kinds) != 1:
            raise c.error(item, w, f"give exactly one of {', '.join(PROBE_KINDS)}")
        kind = kinds[0]
        value_node, value = values[kind]
        if kind == "log":
            try:
                re.compile(value)
            except re.error as error:
                raise c.error(value_node, f"{w}.log", f"bad regular expression {value!r}: {error}") from None
        if kind == "tcp" and not 1 <= value <= 65535:
            raise c.error(value_node, f"{w}.tcp", "a guest port 1..65535")
        if kind == "http" and not re.match(r"^https?://", value):
            raise c.error(value_node, f"{w}.http", f"{value!r} is not an http(s) URL ({{address}} is the guest's IP)")
        status = 200
        if "status" in values:
            status_node, status = values["status"]
            if kind != "http" or not 100 <= status <= 599:
                raise c.error(status_node, f"{w}.status", "an HTTP status 100..599, for http probes only")
        timeout = 60.0
        if "timeout" in values:
            timeout_node, text = values["timeout"]
            try:
                timeout = float(text.rstrip("s"))
            except ValueError:
                raise c.error(timeout_node, f"{w}.timeout", f"{text!r} is not a number of seconds") from None
            if not 0 < timeout <= 86400:
                raise c.error(timeout_node, f"{w}.timeout", "must be more than 0 and at most a day")
        hint = values["hint"][1] if "hint" in values else None
        probes.append(ProbeSpec(kind, str(value), status, timeout, hint, f"{c.source}:{item.start_mark.line + 1}"))
    return tuple(probes)


def _provision(c: _Context, node: yaml.Node, where: str) -> tuple[ProvisionSpec, ...]:
    def item(n, w):
        if isinstance(n, yaml.ScalarNode):
            return ProvisionSpec(c.scalar(n, w, str))
        values = c.mapping(n, w, {"script": lambda n2, w2: c.scalar(n2, w2, str),
                                  "user": lambda n2, w2: c.scalar(n2, w2, str)})
        if "script" not in values:
            raise c.error(n, f"{w}.script", "missing: the shell script to run")
        if "user" in values and not USER.match(values["user"]):
            raise c.error(n, f"{w}.user", f"{values['user']!r} is not a user name")
        return ProvisionSpec(values["script"], values.get("user", "root"))
    return tuple(c.sequence(node, where, item))


def _check_not_smaller(c: _Context, node: yaml.Node, where: str, image: Path, size: int) -> None:
    """An overlay cannot shrink its base: the guest would lose the end of the disk."""
    from ..disk.qcow2.create import describe_base

    try:
        base = describe_base(str(image)).size
    except VmctlError as error:
        raise c.error(node, where, f"{image}: {error}") from None
    if size < base:
        raise c.error(node, where, f"{size} bytes is smaller than the image ({base} bytes): disks can grow, not shrink")


def _network(c: _Context, node: yaml.Node, where: str) -> NetworkSpec:
    if isinstance(node, yaml.ScalarNode):  # shorthand: just the mode
        node_mode = node
        values = {"mode": node_mode}
    else:
        values = c.mapping(node, where, {
            "mode": lambda n, w: n,
            "mac": lambda n, w: n,
            "forwards": lambda n, w: n,
        })
    mode = "none"
    if "mode" in values:
        mode = c.scalar(values["mode"], f"{where}.mode", str)
        if mode not in NETWORK_MODES:
            hint = difflib.get_close_matches(mode, NETWORK_MODES, n=1)
            raise c.error(values["mode"], f"{where}.mode", f"unknown mode {mode!r}" + (f" (did you mean {hint[0]!r}?)" if hint else f" (one of {', '.join(NETWORK_MODES)})"))
    mac = None
    if "mac" in values:
        mac = c.scalar(values["mac"], f"{where}.mac", str).lower()
        if not MAC.match(mac):
            raise c.error(values["mac"], f"{where}.mac", f"{mac!r} is not a MAC address like 52:54:00:12:34:56")
        if int(mac[:2], 16) & 1:
            raise c.error(values["mac"], f"{where}.mac", f"{mac} is a multicast address")
    forwards: list[PortForward] = []
    if "forwards" in values:
        for index, item in enumerate(c.sequence(values["forwards"], f"{where}.forwards", lambda n, w: n)):
            w = f"{where}.forwards[{index}]"
            text = c.scalar(item, w, str)
            match = FORWARD.match(text)
            if not match:
                raise c.error(item, w, f"{text!r} is not HOST:GUEST[/tcp|/udp], e.g. 8080:80")
            host, guest = int(match.group(1)), int(match.group(2))
            if not (0 <= host <= 65535 and 1 <= guest <= 65535):
                raise c.error(item, w, "ports must be 1..65535 (host port 0: any free port)")
            forwards.append(PortForward(host, guest, match.group(3) or "tcp"))
        if mode == "none":
            raise c.error(values["forwards"], f"{where}.forwards", "port forwards need a network: set mode to nat")
    return NetworkSpec(mode=mode, mac=mac, forwards=tuple(forwards))


def _ssh(c: _Context, node: yaml.Node, where: str) -> SshSpec:
    def key(n, w):
        text = c.scalar(n, w, str)
        if text.startswith(("ssh-", "ecdsa-", "sk-")):
            return text
        return str(c.path(n, w))

    def user(n, w):
        text = c.scalar(n, w, str)
        if not USER.match(text):
            raise c.error(n, w, f"{text!r} is not a user name (lowercase letters, digits, '_', '-')")
        return text

    values = c.mapping(node, where, {"user": user, "authorized_key": key})
    return SshSpec(**values)


LIBVIRT_URI = re.compile(r"^[a-z][a-z0-9+.-]*://")
BRIDGE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


def _libvirt(c: _Context, node: yaml.Node, where: str) -> LibvirtSpec:
    def uri(n, w):
        text = c.scalar(n, w, str)
        if not LIBVIRT_URI.match(text):
            raise c.error(n, w, f"{text!r} is not a libvirt URI like qemu:///system or qemu+ssh://user@host/system")
        return text

    def domain_type(n, w):
        value = c.scalar(n, w, str)
        if value not in LIBVIRT_DOMAIN_TYPES:
            raise c.error(n, w, f"unknown domain type {value!r} (one of {', '.join(LIBVIRT_DOMAIN_TYPES)})")
        return value

    def bridge(n, w):
        value = c.scalar(n, w, str)
        if not BRIDGE_NAME.match(value):
            raise c.error(n, w, f"{value!r} is not a network interface name")
        return value

    def vsock(n, w):
        value = yaml.safe_load(yaml.serialize(n)) if isinstance(n, yaml.ScalarNode) else None
        if value is True:
            return 0  # libvirt assigns a free CID
        if value is False:
            return None
        cid = c.scalar(n, w, int)
        if not 3 <= cid < 1 << 32:
            raise c.error(n, w, f"{cid} is not a guest CID (3..4294967295, or true for any)")
        return cid

    values = c.mapping(node, where, {
        "uri": uri,
        "domain_type": domain_type,
        "network": lambda n, w: c.scalar(n, w, str),
        "bridge": bridge,
        "vsock": vsock,
        "upload": lambda n, w: c.scalar(n, w, bool),
    })
    if "network" in values and "bridge" in values:
        raise c.error(node, f"{where}.bridge", "give `network` or `bridge`, not both")
    return LibvirtSpec(**values)
