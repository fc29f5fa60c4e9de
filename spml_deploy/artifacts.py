"""Run folders and bundles: the ``spml.json`` manifest, file hashes, atomic writes.

A manifest describes a run folder (written by ``train``) or a bundle (written by ``export``):
model config, preprocessing, segmentation settings (k-means grid, random walk, kNN), classes
and palette, the files with their sha256, exports with their parity numbers, provenance. It is
the only contract between stages besides the files: everything inference needs is in it.

Manifests written before the ``segmentation`` section existed are read with the section taken
from the folder's ``config.json`` (the run's training configuration), else the defaults.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spml_deploy import __version__
from spml_deploy.config import (ModelConfig, PreprocessConfig, SegmentationConfig, from_dict,
                                to_dict)
from spml_deploy.errors import ConfigError, ManifestError, require
from spml_deploy.data.imageio import atomic_write_bytes, atomic_write_text

SCHEMA_VERSION = 1
MANIFEST = "spml.json"
RUN_CONFIG = "config.json"          # a run's resolved training configuration
ONNX_METADATA_KEY = "spml"          # the ONNX metadata entry holding a copy of the manifest


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file and ``os.replace`` (no corrupt checkpoint on kill)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_weights(path: str | Path) -> dict:
    """Load a state dict saved by this project (``weights_only=True``: no pickled code runs)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ManifestError("weights file is missing", path=path,
                            fix="point to a complete run folder, or re-run training with --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/truncated archives
        raise ManifestError(f"weights file is corrupt or not a weights-only state dict ({exc})",
                            path=path, fix="re-run training (or --resume from the checkpoint)") from exc


@dataclass
class Manifest:
    """Contents of ``spml.json``."""

    kind: str                                   # "run" or "bundle"
    model: ModelConfig
    preprocess: PreprocessConfig
    classes: list[str]
    palette: list[list[int]]
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)   # role -> {path, sha256, bytes}
    exports: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)           # supervision, iters, metrics
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def add_file(self, folder: str | Path, role: str, relpath: str) -> None:
        p = Path(folder) / relpath
        self.files[role] = {"path": relpath, "sha256": sha256_file(p), "bytes": p.stat().st_size}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "model": to_dict(self.model),
            "preprocess": to_dict(self.preprocess),
            "classes": list(self.classes),
            "palette": [list(map(int, c)) for c in self.palette],
            "segmentation": to_dict(self.segmentation),
            "files": self.files,
            "exports": self.exports,
            "training": self.training,
            "provenance": self.provenance,
        }


def provenance() -> dict[str, Any]:
    import torch

    return {
        "spml_deploy": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def model_folder(path: str | Path) -> Path:
    """The run or bundle folder that ``path`` names: the folder itself, or the folder of a file
    inside it (model.onnx, spml.json). :class:`ManifestError` naming ``path`` as given when it
    does not exist (rather than looking for a manifest in its parent)."""
    p = Path(path)
    if not p.exists():
        raise ManifestError("no such run folder, bundle or model file (the path does not exist)",
                            path=p, fix="check the path: pass the folder written by 'spml-deploy "
                                        "train' (--out) or 'spml-deploy export'")
    return p if p.is_dir() else p.parent


def _legacy_segmentation(folder: Path | None) -> SegmentationConfig:
    """The segmentation settings of a manifest written without them: the ``segmentation``
    section of the run's ``config.json`` in ``folder`` when there is one, else the defaults."""
    cfg_path = None if folder is None else folder / RUN_CONFIG
    if cfg_path is None or not cfg_path.is_file():
        return SegmentationConfig()
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"config.json is not valid JSON ({exc.msg}); spml.json has no "
                            "'segmentation' section, so the run's settings are read from it",
                            path=cfg_path, fix="restore the run's config.json") from exc
    try:
        return from_dict(SegmentationConfig, dict(data.get("segmentation", {})))
    except (ConfigError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"config.json has an invalid 'segmentation' section ({exc})",
                            path=cfg_path, fix="restore the run's config.json") from exc


def manifest_from_dict(data: dict[str, Any], where: str | Path,
                       folder: str | Path | None = None) -> Manifest:
    """A :class:`Manifest` from its ``to_dict()`` form (``spml.json`` or the ONNX metadata copy).

    ``where`` names the source in errors; ``folder`` is the run/bundle folder whose
    ``config.json`` supplies the segmentation settings of a manifest written without them.
    """
    where = Path(where)
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ManifestError("not an spml-deploy manifest (no schema_version)", path=where)
    if not isinstance(data["schema_version"], int):
        raise ManifestError(f"manifest is malformed (schema_version {data['schema_version']!r} "
                            "is not a whole number)", path=where)
    if data["schema_version"] > SCHEMA_VERSION:
        raise ManifestError(f"manifest schema {data['schema_version']} is newer than this "
                            f"spml-deploy understands ({SCHEMA_VERSION})", path=where,
                            fix="upgrade spml-deploy")
    try:
        if "segmentation" in data:
            segmentation = from_dict(SegmentationConfig, data["segmentation"])
        else:
            segmentation = _legacy_segmentation(None if folder is None else Path(folder))
        return Manifest(
            kind=data["kind"],
            model=from_dict(ModelConfig, data["model"]),
            preprocess=from_dict(PreprocessConfig, data["preprocess"]),
            classes=list(data["classes"]),
            palette=[list(c) for c in data["palette"]],
            segmentation=segmentation,
            files=dict(data.get("files", {})),
            exports=list(data.get("exports", [])),
            training=dict(data.get("training", {})),
            provenance=dict(data.get("provenance", {})),
            schema_version=int(data["schema_version"]),
        )
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ManifestError(f"manifest is incomplete or malformed ({exc})", path=where) from exc


def read_onnx_manifest(onnx_path: str | Path) -> Manifest:
    """The manifest stored in an ONNX file's metadata (key ``spml``) by the exporter
    (needs the optional ``onnx`` package, imported here)."""
    onnx = require("onnx", "onnx", "reading an ONNX model's metadata")
    p = Path(onnx_path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise ManifestError(f"not a readable ONNX file ({exc})", path=p,
                            fix="re-export with 'spml-deploy export'") from exc
    meta = {m.key: m.value for m in model.metadata_props}
    if ONNX_METADATA_KEY not in meta:
        raise ManifestError(f"ONNX file has no '{ONNX_METADATA_KEY}' metadata and no spml.json "
                            "next to it", path=p, fix="export it with 'spml-deploy export'")
    try:
        data = json.loads(meta[ONNX_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ManifestError(f"the ONNX file's '{ONNX_METADATA_KEY}' metadata is not valid JSON "
                            f"({exc.msg})", path=p, fix="re-export with 'spml-deploy export'") \
            from exc
    return manifest_from_dict(data, p)


def verify_files(folder: str | Path, manifest: Manifest) -> None:
    """Check that every file ``manifest`` lists is in ``folder`` with its recorded sha256."""
    root = Path(folder)
    for role, info in manifest.files.items():
        fp = root / info["path"]
        if not fp.is_file():
            raise ManifestError(f"file '{info['path']}' ({role}) listed in spml.json is missing",
                                path=root, fix="copy the complete folder, or re-create it")
        if info.get("sha256") and sha256_file(fp) != info["sha256"]:
            raise ManifestError(f"file '{info['path']}' ({role}) does not match its sha256 in "
                                "spml.json (corrupt or replaced)", path=root,
                                fix="re-create the folder (train/export again)")


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read and validate ``folder/spml.json``; with ``verify``, check every listed file's sha256
    (:func:`verify_files`)."""
    folder = Path(folder)
    path = folder / MANIFEST if folder.is_dir() or not folder.suffix else folder
    if not path.is_file():
        raise ManifestError("no spml.json here: not a run folder or bundle", path=folder,
                            fix="pass the folder written by 'spml-deploy train' or 'spml-deploy export'")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                            path=path) from exc
    m = manifest_from_dict(data, path, folder=path.parent)
    if verify:
        verify_files(path.parent, m)
    return m
