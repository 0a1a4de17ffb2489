"""The image store in the cache: blobs by digest, each layer unpacked once, names -> images.

    <cache>/oci/blobs/sha256/<hex>     every blob as imported (manifests, configs, layer tars)
    <cache>/oci/layers/<hex>/          a layer unpacked (hex of its diff_id), an overlayfs lower
    <cache>/oci/layers/<hex>.json      what unpacking found: entries, bytes, whiteouts, opaque dirs
    <cache>/oci/layers/<hex>.ext4      the same layer as a read-only ext4 disk, made for VMs
    <cache>/oci/images/<name>.json     an image: its manifest, config and layers
    <cache>/oci/tmp/<pid>-<n>/         one import while it runs

Blobs and layers are shared by every image that has them, and by machines using them. An
import stages everything under tmp/ and moves it in at the very end, then writes the image
record under a temporary name and renames it: a failed or interrupted import leaves nothing.
Every change happens under one lock (<cache>/oci/.lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import shutil
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ..errors import VmctlError
from ..paths import cache_dir
from ..proc import allocated_bytes, pid_alive
from . import digest as dg
from .manifest import ImageConfig, LayerBlob, Resolved, load_json, resolve
from .source import open_source
from .unpack import LayerStats, apply_layer, check_whiteouts, unpack

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}$")
USES_FILE = "oci-layers.json"  # in a machine's state folder: the layers it runs on
_counter = itertools.count()


@dataclass(frozen=True)
class LayerRecord:
    digest: str
    diff_id: str
    size: int  # of the blob
    media_type: str


@dataclass(frozen=True)
class ImageRecord:
    name: str
    manifest: str
    config: str
    layers: tuple[LayerRecord, ...]
    source: str
    imported: float

    @classmethod
    def from_json(cls, data: dict) -> "ImageRecord":
        return cls(data["name"], data["manifest"], data["config"],
                   tuple(LayerRecord(**layer) for layer in data["layers"]), data["source"], data["imported"])

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]


def check_name(name: str) -> str:
    if not NAME.match(name) or ".." in name:
        raise VmctlError(f"image name {name!r}: use letters, digits and . _ : / + - (at most 128)")
    return name


def default_name(source: Path) -> str:
    """some-image.tar -> some-image (so `import X.tar` then `oci:X` works)."""
    name = source.resolve().name if source.is_dir() else source.name
    for suffix in (".tar.gz", ".tgz", ".tar", ".oci"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        # $VMCTL_OCI_DIR: a store outside the cache (it must be a file system with trusted.*
        # xattrs and device nodes, e.g. not overlayfs: the nested host's tests use a tmpfs)
        self.root = root or Path(os.environ.get("VMCTL_OCI_DIR") or cache_dir() / "oci")

    # --- paths ---
    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / dg.hex_part(digest)

    def layer_dir(self, diff_id: str) -> Path:
        return self.root / "layers" / dg.hex_part(diff_id)

    def layer_meta(self, diff_id: str) -> Path:
        return self.root / "layers" / f"{dg.hex_part(diff_id)}.json"

    def layer_disk(self, diff_id: str) -> Path:
        return self.root / "layers" / f"{dg.hex_part(diff_id)}.ext4"

    def _record_path(self, name: str) -> Path:
        return self.root / "images" / f"{urllib.parse.quote(name, safe='')}.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator["ImageStore"]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- reading ---
    def names(self) -> list[str]:
        folder = self.root / "images"
        if not folder.is_dir():
            return []
        return sorted(urllib.parse.unquote(p.name[:-5]) for p in folder.glob("*.json"))

    def get(self, name: str) -> ImageRecord:
        path = self._record_path(check_name(name))
        try:
            return ImageRecord.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            known = ", ".join(self.names()) or "none"
            raise VmctlError(f"no image named {name!r} (images: {known}; vmctl image import FILE --name {name})") from None

    def config(self, image: ImageRecord) -> ImageConfig:
        where = f"image {image.name}: config {dg.short(image.config)}"
        return ImageConfig.from_json(load_json(self.blob(image.config).read_bytes(), where), where)

    def layer_stats(self, diff_id: str) -> dict:
        return json.loads(self.layer_meta(diff_id).read_text())

    def lowers(self, image: ImageRecord) -> list[Path]:
        """The unpacked layer directories, top first (overlayfs lowerdir order)."""
        return [self.layer_dir(d) for d in reversed(image.diff_ids)]

    # --- import ---
    def import_image(self, path: Path, name: str | None = None, say=lambda message: None) -> ImageRecord:
        source = open_source(path)
        try:
            resolved = resolve(source)
            name = check_name(name or default_name(path))
            with self.locked():
                self._clean_stale()
                staging = self.root / "tmp" / f"{os.getpid()}-{next(_counter)}"
                staging.mkdir(parents=True)
                try:
                    record = self._import(source, resolved, name, str(path), staging, say)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        finally:
            source.close()
        return record

    def _import(self, source, resolved: Resolved, name: str, origin: str, staging: Path, say) -> ImageRecord:
        staged_blobs: dict[str, Path] = {}
        for digest, data in ((resolved.manifest_digest, resolved.manifest), (resolved.config_digest, resolved.config)):
            if not self.blob(digest).exists():
                staged_blobs[digest] = staging / "blobs" / dg.hex_part(digest)
                staged_blobs[digest].parent.mkdir(parents=True, exist_ok=True)
                staged_blobs[digest].write_bytes(data)
        count = len(resolved.layers)
        for position, layer in enumerate(resolved.layers, start=1):
            if self.blob(layer.digest).exists() or layer.digest in staged_blobs:
                continue
            say(f"layer {position}/{count}: copying blob {dg.short(layer.digest)} ({layer.size} bytes)")
            target = staging / "blobs" / dg.hex_part(layer.digest)
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_verified(source, layer, target, f"{source.label}: blob {dg.short(layer.digest)} (layer {position}/{count})")
            staged_blobs[layer.digest] = target
        staged_layers: dict[str, Path] = {}
        stats: dict[str, dict] = {}
        present: set[str] = set()
        lowers: list[Path] = []
        for position, layer in enumerate(resolved.layers, start=1):
            label = f"{source.label}: blob {dg.short(layer.digest)} (layer {position}/{count})"
            final = self.layer_dir(layer.diff_id)
            if final.is_dir():
                stats[layer.diff_id] = self.layer_stats(layer.diff_id)
                where = final
            elif layer.diff_id in staged_layers:
                where = staged_layers[layer.diff_id]
            else:
                say(f"layer {position}/{count}: unpacking {dg.short(layer.diff_id)}")
                where = staging / "layers" / dg.hex_part(layer.diff_id)
                blob = staged_blobs.get(layer.digest) or self.blob(layer.digest)
                with open(blob, "rb") as handle:
                    found: LayerStats = unpack(handle, layer.compression, where, layer.diff_id, label,
                                               lowers=list(reversed(lowers)))
                staged_layers[layer.diff_id] = where
                stats[layer.diff_id] = {**asdict(found), "disk_bytes": allocated_bytes(where)}
            check_whiteouts(stats[layer.diff_id]["whiteouts"], present, label)
            apply_layer(present, where)
            lowers.append(where)
        # everything verified: move it in, then name it
        for digest, staged in staged_blobs.items():
            final_blob = self.blob(digest)
            final_blob.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final_blob)
        for diff_id, staged in staged_layers.items():
            meta = self.layer_meta(diff_id)
            _write_atomic(meta, json.dumps(stats[diff_id]).encode())
            os.rename(staged, self.layer_dir(diff_id))
        record = ImageRecord(name, resolved.manifest_digest, resolved.config_digest,
                             tuple(LayerRecord(layer.digest, layer.diff_id, layer.size, layer.media_type) for layer in resolved.layers),
                             origin, time.time())
        _write_atomic(self._record_path(name), json.dumps(asdict(record), indent=2).encode())
        return record

    def _clean_stale(self) -> None:
        folder = self.root / "tmp"
        if not folder.is_dir():
            return
        for entry in folder.iterdir():
            pid = entry.name.split("-", 1)[0]
            if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
                shutil.rmtree(entry, ignore_errors=True)

    # --- removal ---
    def remove(self, name: str) -> list[str]:
        """Forget `name`, then delete what no image and no machine uses; what was deleted."""
        with self.locked():
            self.get(name)
            self._record_path(name).unlink()
            return self._collect()

    def in_use_by_machines(self) -> set[str]:
        """diff_ids that machines (running or not yet removed) use, from their state folders."""
        from ..state import StateStore

        used: set[str] = set()
        root = StateStore().root
        for path in root.glob(f"*/{USES_FILE}") if root.is_dir() else []:
            try:
                used.update(json.loads(path.read_text())["diff_ids"])
            except (OSError, ValueError, KeyError):
                continue
        return used

    def _collect(self) -> list[str]:
        blobs: set[str] = set()
        layers: set[str] = set(self.in_use_by_machines())
        for other in self.names():
            image = self.get(other)
            blobs.update([image.manifest, image.config, *(layer.digest for layer in image.layers)])
            layers.update(image.diff_ids)
        removed = []
        blob_dir = self.root / "blobs" / "sha256"
        for path in sorted(blob_dir.iterdir()) if blob_dir.is_dir() else []:
            if f"sha256:{path.name}" not in blobs:
                path.unlink()
                removed.append(f"blob sha256:{path.name[:12]}")
        layer_root = self.root / "layers"
        for path in sorted(layer_root.iterdir()) if layer_root.is_dir() else []:
            hex_name = path.name.split(".", 1)[0]
            if f"sha256:{hex_name}" in layers:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
                removed.append(f"layer sha256:{hex_name[:12]}")
            else:
                path.unlink()
        return removed

    # --- usage ---
    def usage(self) -> list[dict]:
        """Per image: layers, bytes unpacked, bytes shared with another image."""
        images = [self.get(name) for name in self.names()]
        users: dict[str, int] = {}
        for image in images:
            for diff_id in set(image.diff_ids):
                users[diff_id] = users.get(diff_id, 0) + 1
        rows = []
        for image in images:
            sizes = {d: self._disk_bytes(d) for d in set(image.diff_ids)}
            rows.append({
                "name": image.name, "manifest": image.manifest, "layers": len(image.layers),
                "blob_bytes": sum(layer.size for layer in image.layers),
                "unpacked_bytes": sum(sizes.values()),
                "shared_bytes": sum(size for d, size in sizes.items() if users[d] > 1),
                "layer_list": [{"diff_id": layer.diff_id, "blob": layer.digest, "blob_bytes": layer.size,
                                "unpacked_bytes": sizes[layer.diff_id], "images": users[layer.diff_id]}
                               for layer in image.layers],
            })
        return rows

    def _disk_bytes(self, diff_id: str) -> int:
        try:
            return int(self.layer_stats(diff_id).get("disk_bytes", 0))
        except (OSError, ValueError):
            return 0

    def store_bytes(self) -> int:
        return allocated_bytes(self.root) if self.root.exists() else 0


def _copy_verified(source, layer: LayerBlob, target: Path, label: str) -> None:
    hashed = 0
    with source.open(layer.name) as (handle, size):
        if size != layer.size:
            raise VmctlError(f"{label}: {size} bytes, the manifest says {layer.size}")
        if size > shutil.disk_usage(target.parent).free:
            raise VmctlError(f"{label}: {size} bytes, more than the store has free")
        reader = dg.HashingReader(handle)
        with open(target, "wb") as out:
            while chunk := reader.read(dg.CHUNK):
                out.write(chunk)
        hashed = reader.count
    if hashed != layer.size:
        raise VmctlError(f"{label}: truncated ({hashed} of {layer.size} bytes)")
    if reader.digest != layer.digest:
        raise VmctlError(f"{label}: digest mismatch (content is {dg.short(reader.digest)})")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
