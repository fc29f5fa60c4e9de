"""An opened run folder or bundle: its manifest, verified once, and its weights, loaded once.

Every command that takes a model path (``segment``, ``export``, ``benchmark``, ``serve``,
``index``) opens it with :func:`load_bundle` and hands the :class:`Bundle` to whatever needs
it (backends, the pipeline, the exporter, the retrieval index): the sha256 of every listed file
is checked once per command and ``weights.pt`` is read once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from spml_deploy.artifacts import (MANIFEST, Manifest, load_weights, model_folder,
                                   read_manifest, read_onnx_manifest, verify_files)
from spml_deploy.config import ModelConfig, PreprocessConfig, SegmentationConfig
from spml_deploy.engine.model import EmbeddingNet, PixelClassifier, SegmentationModel
from spml_deploy.errors import ManifestError


@dataclass
class Bundle:
    """A run folder or bundle with its manifest.

    ``source`` is the path as the user gave it (the folder, or a file inside it such as
    ``model.onnx``); ``verified`` says whether the files' sha256 were checked. A bare ONNX file
    without ``spml.json`` next to it is a bundle whose manifest comes from the file's metadata.
    """

    folder: Path
    manifest: Manifest
    source: Path | None = None
    verified: bool = False
    _state: dict[str, Any] | None = field(default=None, repr=False)
    _model: SegmentationModel | None = field(default=None, repr=False)

    # -- what the manifest says ------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``run`` (written by train) or ``bundle`` (written by export)."""
        return self.manifest.kind

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def palette(self) -> list[list[int]]:
        return self.manifest.palette

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.manifest.preprocess

    @property
    def model_config(self) -> ModelConfig:
        return self.manifest.model

    @property
    def segmentation(self) -> SegmentationConfig:
        """The k-means, random-walk and kNN settings the model was trained with."""
        return self.manifest.segmentation

    def has(self, role: str) -> bool:
        """Whether the manifest lists a file of ``role`` (weights, onnx, engine, memory, ...)."""
        return role in self.manifest.files

    def path(self, role: str) -> Path:
        """The file of ``role``; :class:`ManifestError` when the manifest lists none."""
        info = self.manifest.files.get(role)
        if info is None:
            raise ManifestError(f"spml.json lists no '{role}' file", path=self.folder,
                                fix="pass a run folder written by 'spml-deploy train' (or its "
                                    "bundle)")
        return self.folder / info["path"]

    def model_file(self, role: str, default_name: str) -> Path:
        """The model file a backend runs: the file the user named (``model.onnx`` given as a
        path), else the manifest's file of ``role`` (``onnx``/``engine``), else
        ``default_name`` in the folder. :class:`ManifestError` with the export command to run
        when it does not exist."""
        if self.source is not None and self.source.is_file() and self.source.name != MANIFEST:
            return self.source
        rel = self.manifest.files.get(role, {}).get("path", default_name)
        f = self.folder / rel
        if not f.is_file():
            fmt = "engine" if role == "engine" else "onnx"
            shown = self.source if self.source is not None else self.folder
            if self.kind == "run":
                fix = f"export a bundle first: spml-deploy export {shown} --format {fmt}"
            else:
                fix = f"re-export the bundle from its run folder with --format {fmt}"
            what = "run folder" if self.kind == "run" else "bundle"
            raise ManifestError(f"this {what} has no {default_name}", path=self.folder, fix=fix)
        return f

    def verify(self) -> None:
        """Check every listed file against its sha256 (once; later calls return at once)."""
        if not self.verified:
            verify_files(self.folder, self.manifest)
            self.verified = True

    # -- the torch model -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``weights.pt`` (role ``weights``): ``{"net": EmbeddingNet state dict, "f0":
        PixelClassifier state dict[, "f1": final classifier]}``, read on the first call."""
        if self._state is None:
            wpath = self.path("weights")
            state = load_weights(wpath)
            if not isinstance(state, dict) or "net" not in state or "f0" not in state:
                keys = sorted(state) if isinstance(state, dict) else type(state).__name__
                raise ManifestError(f"weights file has no 'net'/'f0' entries (found {keys})",
                                    path=wpath, fix="re-run training; weights.pt must hold "
                                                    "{'net', 'f0'[, 'f1']}")
            self._state = state
        return self._state

    def segmentation_model(self) -> SegmentationModel:
        """Network + inference classifier (``f1`` when trained, else ``f0``) on the CPU in eval
        mode, built on the first call and shared afterwards: callers that move it to another
        device, change its memory format or precision work on a copy.
        Mismatching weights raise :class:`ManifestError` naming the file and the fix."""
        if self._model is None:
            self._model = _build_model(self.state_dict(), self.manifest, self.path("weights"))
        return self._model


def _stem_from_state(state: dict[str, Tensor]) -> str:
    """The backbone stem a saved EmbeddingNet state dict was built with."""
    return "deep" if "backbone.conv2.weight" in state else "torchvision"


def _build_model(state: dict[str, Any], manifest: Manifest, wpath: Path) -> SegmentationModel:
    clf_key = "f1" if "f1" in state else "f0"
    cfg = manifest.model
    try:
        net = EmbeddingNet(cfg, stem=_stem_from_state(state["net"]))
        net.load_state_dict(state["net"])
        w = state[clf_key]["conv2.weight"]
        if w.shape[0] != manifest.num_classes:
            raise ManifestError(f"classifier '{clf_key}' has {w.shape[0]} classes but spml.json "
                                f"lists {manifest.num_classes}", path=wpath,
                                fix="the weights and spml.json come from different runs; re-export")
        clf = PixelClassifier(cfg.embed_dim, int(w.shape[0]), cfg.classifier_dropout)
        clf.load_state_dict(state[clf_key])
    except (RuntimeError, KeyError) as exc:
        raise ManifestError(f"weights do not fit the model in spml.json ({str(exc).splitlines()[0]})",
                            path=wpath, fix="the weights and spml.json come from different runs") \
            from exc
    model = SegmentationModel(net, clf).eval()
    model.classifier_key = clf_key  # type: ignore[attr-defined]
    return model


def load_bundle(path: str | Path | Bundle, verify: bool = True) -> Bundle:
    """Open a run folder, a bundle, or a model file inside one (``model.onnx``,
    ``model.engine``, ``spml.json``); a bare ``model.onnx`` without ``spml.json`` next to it
    is opened with the manifest of its metadata.

    ``verify`` checks every listed file's sha256. A :class:`Bundle` is returned unchanged:
    whoever opened it chose whether to verify it (:meth:`Bundle.verify` checks it later).
    Errors are :class:`ManifestError` naming the path and the fix.
    """
    if isinstance(path, Bundle):
        return path
    p = Path(path)
    folder = model_folder(p)
    if p.is_file() and not (folder / MANIFEST).is_file():
        if p.suffix == ".onnx":
            return Bundle(folder, read_onnx_manifest(p), source=p, verified=True)
        raise ManifestError(f"no spml.json next to {p.name}", path=folder,
                            fix="keep the model file inside its run folder or bundle")
    manifest = read_manifest(folder, verify=False)
    bundle = Bundle(folder, manifest, source=p)
    if verify:
        bundle.verify()
    return bundle
