"""From a source to one image: index -> (nested index ->) manifest -> config and layers.

OCI layouts and OCI archives are read as the image-spec says; a `docker save` tarball
(manifest.json, <id>/layer.tar, <hex>.json) is read the same way and given an OCI manifest,
so the store holds one format. JSON blobs are verified here (digest and size); layer blobs
are verified while they are copied into the store (store.py), never trusted before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import VmctlError
from . import digest as dg
from .source import Source, inner_name

PLATFORM = ("linux", "amd64")
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TYPES = {
    LAYER_TAR: "tar", "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",
    LAYER_GZIP: "gzip", "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
REF_NAME = "org.opencontainers.image.ref.name"
MAX_DEPTH = 4  # nested indexes


@dataclass(frozen=True)
class LayerBlob:
    digest: str  # of the blob as stored (compressed or not)
    size: int
    media_type: str
    diff_id: str  # of the uncompressed tar (the config's rootfs.diff_ids)
    name: str  # where the blob is inside the source

    @property
    def compression(self) -> str:
        return LAYER_TYPES[self.media_type]


@dataclass(frozen=True)
class ImageConfig:
    """What the image says to run (config.config of the image spec)."""

    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "ImageConfig":
        section = data.get("config") or {}
        if not isinstance(section, dict):
            raise VmctlError(f"{where}: config: expected an object")

        def strings(key: str) -> tuple[str, ...]:
            value = section.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise VmctlError(f"{where}: config.{key}: expected a list of strings")
            return tuple(value)

        def text(key: str) -> str:
            value = section.get(key) or ""
            if not isinstance(value, str):
                raise VmctlError(f"{where}: config.{key}: expected a string")
            return value

        return cls(strings("Env"), strings("Entrypoint"), strings("Cmd"), text("WorkingDir"), text("User"))

    def environment(self) -> dict[str, str]:
        return dict(tuple(item.split("=", 1)) if "=" in item else (item, "") for item in self.env)  # type: ignore[misc]


@dataclass(frozen=True)
class Resolved:
    manifest: bytes  # OCI manifest JSON (made for docker-save sources)
    manifest_digest: str
    config: bytes
    config_digest: str
    layers: tuple[LayerBlob, ...]
    ref_name: str | None = None
    blobs: dict[str, str] = field(default_factory=dict)  # digest -> name in the source (JSON blobs)


def load_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as error:
        raise VmctlError(f"{where}: not valid JSON: {error}") from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise VmctlError(f"{where}: expected a JSON object")
    return value


def _descriptor(value: Any, where: str) -> tuple[str, str, int]:
    value = _object(value, where)
    media = value.get("mediaType", "")
    if not isinstance(media, str):  # an object here was a TypeError (found by fuzzing)
        raise VmctlError(f"{where}: mediaType: expected a string, got {media!r}")
    size = value.get("size")
    if not isinstance(size, int) or size < 0:
        raise VmctlError(f"{where}: size: expected a byte count, got {size!r}")
    return dg.check(value.get("digest"), f"{where}.digest"), media, size


def read_blob(source: Source, digest: str, size: int, where: str) -> bytes:
    """A small (JSON) blob of an OCI layout, its digest and size verified."""
    name = f"blobs/sha256/{dg.hex_part(digest)}"
    data = source.read_small(name, where)
    if len(data) != size:
        raise VmctlError(f"{where}: blob {dg.short(digest)}: {len(data)} bytes, the descriptor says {size}")
    actual = dg.of_bytes(data)
    if actual != digest:
        raise VmctlError(f"{where}: blob {dg.short(digest)}: digest mismatch (content is {dg.short(actual)})")
    return data


def resolve(source: Source) -> Resolved:
    if source.exists("oci-layout") and source.exists("index.json"):
        return _resolve_oci(source)
    if source.exists("manifest.json"):
        return _resolve_docker(source)
    raise VmctlError(f"{source.label}: neither an OCI image layout (oci-layout, index.json) "
                     f"nor a docker-save archive (manifest.json)")


def _platform_ok(platform: Any) -> bool | None:
    """True: linux/amd64; False: another platform; None: not said."""
    if not isinstance(platform, dict):
        return None
    return (platform.get("os"), platform.get("architecture")) == PLATFORM


def _resolve_oci(source: Source) -> Resolved:
    layout = _object(load_json(source.read_small("oci-layout", "oci-layout"), f"{source.label}: oci-layout"), "oci-layout")
    if layout.get("imageLayoutVersion") != "1.0.0":
        raise VmctlError(f"{source.label}: oci-layout: imageLayoutVersion {layout.get('imageLayoutVersion')!r} (expected 1.0.0)")
    where = f"{source.label}: index.json"
    index = _object(load_json(source.read_small("index.json", where), where), where)
    ref_name = None
    for _depth in range(MAX_DEPTH):
        manifests = index.get("manifests")
        if not isinstance(manifests, list) or not manifests:
            raise VmctlError(f"{where}: manifests: expected a non-empty list")
        chosen, offered = [], []
        for position, entry in enumerate(manifests):
            place = f"{where}: manifests[{position}]"
            digest, media, size = _descriptor(entry, place)
            platform = entry.get("platform")
            verdict = _platform_ok(platform)
            if verdict is False:
                offered.append(f"{platform.get('os')}/{platform.get('architecture')}")
                continue
            chosen.append((digest, media, size, place, entry))
        if not chosen:
            raise VmctlError(f"{where}: no {'/'.join(PLATFORM)} image (offered: {', '.join(offered) or 'none'})")
        if len(chosen) > 1:
            explicit = [c for c in chosen if _platform_ok(c[4].get("platform"))]
            if len(explicit) != 1:
                raise VmctlError(f"{where}: {len(chosen)} images could be {'/'.join(PLATFORM)}; "
                                 f"import a layout holding one")
            chosen = explicit
        digest, media, size, place, entry = chosen[0]
        annotations = entry.get("annotations") or {}
        if isinstance(annotations, dict) and isinstance(annotations.get(REF_NAME), str):
            ref_name = annotations[REF_NAME]
        data = read_blob(source, digest, size, place)
        document = _object(load_json(data, f"{place} (blob {dg.short(digest)})"), place)
        media = media or document.get("mediaType", "")
        if not isinstance(media, str):
            raise VmctlError(f"{place}: mediaType: expected a string, got {media!r}")
        if media in INDEXES or (not media and "manifests" in document):
            index, where = document, f"{source.label}: index {dg.short(digest)}"
            continue
        if media and media not in MANIFESTS:
            raise VmctlError(f"{place}: media type {media!r} is not an image manifest")
        return _from_manifest(source, data, digest, ref_name)
    raise VmctlError(f"{source.label}: indexes nested more than {MAX_DEPTH} deep")


def _from_manifest(source: Source, data: bytes, digest: str, ref_name: str | None) -> Resolved:
    where = f"{source.label}: manifest {dg.short(digest)}"
    manifest = _object(load_json(data, where), where)
    config_digest, _, config_size = _descriptor(manifest.get("config"), f"{where}: config")
    config = read_blob(source, config_digest, config_size, f"{where}: config")
    diff_ids = _check_config(config, f"{source.label}: config {dg.short(config_digest)}")
    layers_json = manifest.get("layers")
    if not isinstance(layers_json, list):
        raise VmctlError(f"{where}: layers: expected a list")
    if len(layers_json) != len(diff_ids):
        raise VmctlError(f"{where}: {len(layers_json)} layers, but the config lists {len(diff_ids)} diff_ids")
    layers = []
    for position, entry in enumerate(layers_json):
        layer_digest, media, size = _descriptor(entry, f"{where}: layers[{position}]")
        if media not in LAYER_TYPES:
            raise VmctlError(f"{where}: layers[{position}]: media type {media!r} is not supported "
                             f"(tar or tar+gzip; zstd is not)")
        layers.append(LayerBlob(layer_digest, size, media, diff_ids[position], f"blobs/sha256/{dg.hex_part(layer_digest)}"))
    return Resolved(data, digest, config, config_digest, tuple(layers), ref_name)


def _check_config(config: bytes, where: str) -> list[str]:
    document = _object(load_json(config, where), where)
    os_name, arch = document.get("os"), document.get("architecture")
    if (os_name, arch) != PLATFORM:
        raise VmctlError(f"{where}: the image is for {os_name}/{arch}, not {'/'.join(PLATFORM)}")
    ImageConfig.from_json(document, where)  # its types are checked now, not at run time
    rootfs = _object(document.get("rootfs"), f"{where}: rootfs")
    if rootfs.get("type") != "layers":
        raise VmctlError(f"{where}: rootfs.type: {rootfs.get('type')!r} (expected 'layers')")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise VmctlError(f"{where}: rootfs.diff_ids: expected a list")
    return [dg.check(value, f"{where}: rootfs.diff_ids[{i}]") for i, value in enumerate(diff_ids)]


def _resolve_docker(source: Source) -> Resolved:
    """docker save (format of Docker 1.10 .. 24): the layers are uncompressed tars whose
    digests are the config's diff_ids; the config file is named by its own digest."""
    where = f"{source.label}: manifest.json"
    entries = load_json(source.read_small("manifest.json", where), where)
    if not isinstance(entries, list) or not entries:
        raise VmctlError(f"{where}: expected a non-empty list")
    if len(entries) > 1:
        raise VmctlError(f"{where}: {len(entries)} images in one archive; save one image per file")
    entry = _object(entries[0], f"{where}[0]")
    config_name = inner_name(entry.get("Config"), f"{where}[0].Config")
    config = source.read_small(config_name, f"{where}[0].Config")
    config_digest = dg.of_bytes(config)
    stem = config_name.rsplit("/", 1)[-1].removesuffix(".json")
    if len(stem) == 64 and dg.hex_part(config_digest) != stem:
        raise VmctlError(f"{source.label}: {config_name}: digest mismatch (content is {dg.short(config_digest)})")
    diff_ids = _check_config(config, f"{source.label}: {config_name}")
    names = entry.get("Layers")
    if not isinstance(names, list) or len(names) != len(diff_ids):
        raise VmctlError(f"{where}[0].Layers: expected {len(diff_ids)} layer files (the config's diff_ids)")
    layers = []
    for position, name in enumerate(names):
        name = inner_name(name, f"{where}[0].Layers[{position}]")
        with source.open(name) as (_, size):
            pass
        # uncompressed: the blob digest is the diff_id, verified when copied
        layers.append(LayerBlob(diff_ids[position], size, LAYER_TAR, diff_ids[position], name))
    tags = entry.get("RepoTags") or []
    manifest = oci_manifest(config_digest, len(config), layers)
    return Resolved(manifest, dg.of_bytes(manifest), config, config_digest, tuple(layers),
                    tags[0] if tags and isinstance(tags[0], str) else None)


def oci_manifest(config_digest: str, config_size: int, layers: list[LayerBlob] | tuple[LayerBlob, ...]) -> bytes:
    document = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size} for layer in layers],
    }
    return json.dumps(document, separators=(",", ":")).encode()
