"""Writing images: layer tars, OCI layouts and archives, docker-save archives.

`vmctl image export` writes a store image as a docker-save archive (what `docker load`
reads) or an OCI archive; the tests build their images with the same functions at test time
(`Layer` for the entries, `write_layout` for the layout), so nothing binary is committed.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VmctlError
from . import digest as dg
from .manifest import LAYER_GZIP, LAYER_TAR, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, PLATFORM, REF_NAME

MTIME = 1_700_000_000  # fixed: the same entries give the same layer digest


@dataclass
class Layer:
    """A layer's tar entries, in order (a whiteout is a `.wh.` file, as in the image spec)."""

    members: list[tuple[tarfile.TarInfo, bytes]] = field(default_factory=list)

    def _add(self, name: str, kind: bytes, mode: int, data: bytes = b"", **attrs: Any) -> "Layer":
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.size = kind, mode, MTIME, len(data)
        info.uid = attrs.pop("uid", 0)
        info.gid = attrs.pop("gid", 0)
        xattrs = attrs.pop("xattrs", {})
        for key, value in attrs.items():
            setattr(info, key, value)
        if xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        self.members.append((info, data))
        return self

    def dir(self, name: str, mode: int = 0o755, **attrs: Any) -> "Layer":
        return self._add(name, tarfile.DIRTYPE, mode, **attrs)

    def file(self, name: str, data: bytes | str, mode: int = 0o644, **attrs: Any) -> "Layer":
        return self._add(name, tarfile.REGTYPE, mode, data.encode() if isinstance(data, str) else data, **attrs)

    def symlink(self, name: str, target: str, **attrs: Any) -> "Layer":
        return self._add(name, tarfile.SYMTYPE, 0o777, linkname=target, **attrs)

    def hardlink(self, name: str, target: str, **attrs: Any) -> "Layer":
        return self._add(name, tarfile.LNKTYPE, 0o644, linkname=target, **attrs)

    def device(self, name: str, major: int, minor: int, block: bool = False, mode: int = 0o600) -> "Layer":
        return self._add(name, tarfile.BLKTYPE if block else tarfile.CHRTYPE, mode, devmajor=major, devminor=minor)

    def fifo(self, name: str, mode: int = 0o644) -> "Layer":
        return self._add(name, tarfile.FIFOTYPE, mode)

    def whiteout(self, path: str) -> "Layer":
        parent, _, base = path.rpartition("/")
        return self.file(f"{parent + '/' if parent else ''}.wh.{base}", b"", mode=0o644)

    def opaque(self, directory: str) -> "Layer":
        return self.file(f"{directory.rstrip('/')}/.wh..wh..opq", b"")

    def tar(self) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as out:
            for info, data in self.members:
                out.addfile(info, io.BytesIO(data) if info.isreg() else None)
        return buffer.getvalue()


def image_config(diff_ids: list[str], env: list[str] | None = None, cmd: list[str] | None = None,
                 entrypoint: list[str] | None = None, working_dir: str = "", user: str = "",
                 platform: tuple[str, str] = PLATFORM) -> dict:
    section: dict[str, Any] = {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    for key, value in (("Cmd", cmd), ("Entrypoint", entrypoint), ("WorkingDir", working_dir), ("User", user)):
        if value:
            section[key] = value
    return {"architecture": platform[1], "os": platform[0], "config": section,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(MTIME))}


def _put_blob(root: Path, data: bytes) -> dict:
    digest = dg.of_bytes(data)
    path = root / "blobs" / "sha256" / dg.hex_part(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def write_layout(root: Path, layers: list[bytes], gzip_layers: bool = True, ref_name: str | None = None,
                 **config: Any) -> dict:
    """An OCI image layout at `root` (created) of uncompressed layer tars; returns the
    manifest descriptor written to index.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    diff_ids = [dg.of_bytes(tar) for tar in layers]
    descriptors = []
    for tar in layers:
        blob = gzip.compress(tar, mtime=0) if gzip_layers else tar
        descriptors.append({"mediaType": LAYER_GZIP if gzip_layers else LAYER_TAR, **_put_blob(root, blob)})
    config_blob = json.dumps(image_config(diff_ids, **config)).encode()
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, **_put_blob(root, config_blob)}, "layers": descriptors}
    descriptor = {"mediaType": OCI_MANIFEST, **_put_blob(root, json.dumps(manifest).encode())}
    if ref_name:
        descriptor["annotations"] = {REF_NAME: ref_name}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]}))
    return descriptor


def tar_directory(root: Path, out: Path) -> None:
    """An archive of a layout directory (an OCI archive), names relative to it."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(root.rglob("*")):
            archive.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)


def export_docker(store, name: str, out: Path) -> None:
    """`docker save`'s format: manifest.json, the config named by its digest, one
    uncompressed layer.tar per layer (gzip blobs are decompressed: docker load wants tars)."""
    image = store.get(name)
    config = store.blob(image.config).read_bytes()
    repo_tag = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
    layer_names = []
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as archive:
            _add_bytes(archive, f"{dg.hex_part(image.config)}.json", config)
            for layer in image.layers:
                member = f"{dg.hex_part(layer.diff_id)}/layer.tar"
                blob = store.blob(layer.digest)
                if layer.media_type.endswith("gzip"):
                    with gzip.open(blob, "rb") as handle:
                        _add_stream(archive, member, handle)
                else:
                    with open(blob, "rb") as handle:
                        _add_stream(archive, member, handle)
                layer_names.append(member)
            manifest = [{"Config": f"{dg.hex_part(image.config)}.json", "RepoTags": [repo_tag], "Layers": layer_names}]
            _add_bytes(archive, "manifest.json", json.dumps(manifest).encode())
        tmp.rename(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_oci(store, name: str, out: Path) -> None:
    """An OCI archive: oci-layout, index.json and the image's blobs as stored."""
    image = store.get(name)
    tmp = out.with_name(f".{out.name}.tmp")
    manifest = store.blob(image.manifest).read_bytes()
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": image.manifest, "size": len(manifest),
         "platform": {"os": PLATFORM[0], "architecture": PLATFORM[1]}, "annotations": {REF_NAME: name}}]}
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as archive:
            _add_bytes(archive, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
            _add_bytes(archive, "index.json", json.dumps(index).encode())
            for digest in dict.fromkeys([image.manifest, image.config, *(layer.digest for layer in image.layers)]):
                with open(store.blob(digest), "rb") as handle:
                    _add_stream(archive, f"blobs/sha256/{dg.hex_part(digest)}", handle)
        tmp.rename(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MTIME, 0o644
    archive.addfile(info, io.BytesIO(data))


def _add_stream(archive: tarfile.TarFile, name: str, handle) -> None:
    """A member whose size is only known after reading (a decompressed layer): spool it."""
    import tempfile

    with tempfile.TemporaryFile() as spool:
        size = 0
        while chunk := handle.read(1 << 20):
            spool.write(chunk)
            size += len(chunk)
        spool.seek(0)
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, MTIME, 0o644
        archive.addfile(info, spool)


def export(store, name: str, out: Path, kind: str = "docker") -> None:
    if kind == "docker":
        export_docker(store, name, out)
    elif kind == "oci":
        export_oci(store, name, out)
    else:
        raise VmctlError(f"export format {kind!r}: docker or oci")
