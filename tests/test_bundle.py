"""The model contract: spml.json's segmentation settings, Bundle/load_bundle (one verification,
one weights load per command), and pipeline options as overrides of the model's settings."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runs import make_run
from spml_deploy import artifacts
from spml_deploy.artifacts import (MANIFEST, manifest_from_dict, read_manifest, write_manifest)
from spml_deploy.config import SegmentationConfig
from spml_deploy.engine import bundle as bundle_mod
from spml_deploy.engine import pipeline as pipeline_mod
from spml_deploy.engine.backends import TorchBackend, load_backend
from spml_deploy.engine.bundle import Bundle, load_bundle
from spml_deploy.engine.pipeline import PipelineOptions, load_pipeline
from spml_deploy.errors import ManifestError

RUN_SEG = SegmentationConfig(test_grid=(8, 8), rw_squarings=2, kmeans_iters=7, knn_k=5,
                             rw_beta=4.0, rw_alpha=10.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run whose spml.json has segmentation settings other than every default."""
    folder = make_run(tmp_path_factory.mktemp("contract") / "run")
    m = read_manifest(folder)
    write_manifest(folder, replace(m, segmentation=RUN_SEG))
    return folder


def _legacy(folder: Path, config_seg: dict | None) -> Path:
    """Turn ``folder`` into a folder written before spml.json had a segmentation section; its
    config.json gets ``config_seg`` as segmentation section (None: no config.json at all)."""
    data = json.loads((folder / MANIFEST).read_text())
    data.pop("segmentation")
    cfg = folder / "config.json"
    if config_seg is None:
        cfg.unlink()
        data["files"].pop("config")
    else:
        full = json.loads(cfg.read_text())
        full["segmentation"] = config_seg
        cfg.write_text(json.dumps(full))
        data["files"]["config"]["sha256"] = artifacts.sha256_file(cfg)
        data["files"]["config"]["bytes"] = cfg.stat().st_size
    (folder / MANIFEST).write_text(json.dumps(data))
    return folder


def _images(folder: Path, n: int = 2) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
        Image.fromarray(coarse).resize((64, 48), Image.BICUBIC).save(folder / f"{i}.png")
    return folder


# --------------------------------------------------------------------------------------------
# spml.json


def test_manifest_round_trips_the_segmentation_section(run):
    m = read_manifest(run)
    assert m.segmentation == RUN_SEG
    data = json.loads((run / MANIFEST).read_text())
    assert data["segmentation"]["test_grid"] == [8, 8] and data["schema_version"] == 1
    assert manifest_from_dict(data, "x").segmentation == RUN_SEG


def test_old_manifest_takes_the_section_from_config_json(tmp_path):
    folder = _legacy(make_run(tmp_path / "old"), {"test_grid": [8, 8], "rw_squarings": 2})
    seg = read_manifest(folder).segmentation
    assert seg.test_grid == (8, 8) and seg.rw_squarings == 2
    assert seg.kmeans_iters == SegmentationConfig().kmeans_iters     # absent keys: defaults


def test_old_manifest_without_config_json_has_the_defaults(tmp_path):
    folder = _legacy(make_run(tmp_path / "old"), None)
    assert read_manifest(folder).segmentation == SegmentationConfig()


def test_old_manifest_with_broken_config_json_names_it(tmp_path):
    folder = _legacy(make_run(tmp_path / "old"), {"rw_squarings": 2})
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ManifestError, match="config.json is not valid JSON") as exc:
        read_manifest(folder, verify=False)
    assert "restore the run's config.json" in str(exc.value)


def test_old_manifest_with_unknown_segmentation_key_is_refused(tmp_path):
    folder = _legacy(make_run(tmp_path / "old"), {"rw_squaring": 2})
    with pytest.raises(ManifestError, match="rw_squarings"):
        read_manifest(folder)


def test_non_integer_schema_version_is_malformed(run):
    data = json.loads((run / MANIFEST).read_text())
    with pytest.raises(ManifestError, match="not a whole number"):
        manifest_from_dict({**data, "schema_version": "1"}, "x")


# --------------------------------------------------------------------------------------------
# Bundle / load_bundle


def test_load_bundle_properties_and_identity(run):
    b = load_bundle(run)
    assert b.verified and b.folder == run and b.kind == "run"
    assert b.segmentation == RUN_SEG and b.num_classes == 4 == len(b.classes)
    assert b.model_config.embed_dim == 32 and b.preprocess.max_side == 512
    assert b.has("weights") and not b.has("onnx")
    assert b.path("weights") == run / "weights.pt"
    with pytest.raises(ManifestError, match="lists no 'memory' file"):
        b.path("memory")
    assert load_bundle(b) is b
    assert load_bundle(run / MANIFEST).folder == run


def test_load_bundle_keeps_model_folder_messages(tmp_path):
    with pytest.raises(ManifestError, match="the path does not exist"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ManifestError, match="no spml.json next to weights.pt"):
        load_bundle(tmp_path / "weights.pt")


def test_verify_false_then_verify_checks_once(run, monkeypatch):
    hashed = Counter()
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p, *a: hashed.update([Path(p).name])
                        or real(p, *a))
    b = load_bundle(run, verify=False)
    assert load_bundle(b) is b and not b.verified and not hashed    # unchanged, not verified
    b.verify()
    b.verify()
    assert b.verified and hashed == Counter({"weights.pt": 1, "config.json": 1})


def test_corrupt_file_is_refused_by_load_bundle(tmp_path):
    folder = make_run(tmp_path / "run")
    with open(folder / "weights.pt", "ab") as f:
        f.write(b"tail")
    with pytest.raises(ManifestError, match="does not match its sha256"):
        load_bundle(folder)


def test_weights_are_read_once_and_the_model_is_shared(run, monkeypatch):
    reads = []
    real = bundle_mod.load_weights
    monkeypatch.setattr(bundle_mod, "load_weights", lambda p: reads.append(p) or real(p))
    b = load_bundle(run)
    m1 = b.segmentation_model()
    a, c = TorchBackend(b), load_backend(b, "torch")
    assert b.segmentation_model() is m1 and len(reads) == 1
    assert a.bundle is b and c.manifest is b.manifest
    x = torch.randn(1, 3, 32, 32)
    pa, la = a(x)
    pc, lc = c(x)
    torch.testing.assert_close(pa, pc)
    torch.testing.assert_close(la, lc)
    # a backend that changes the memory format works on a copy: the shared model is unchanged
    cl = TorchBackend(b, channels_last=True)
    assert cl.model is not m1 and cl.model.net is not m1.net
    assert next(m1.net.parameters()).is_contiguous()


# --------------------------------------------------------------------------------------------
# options are overrides of the model's settings


def test_pipeline_inherits_the_models_settings(run):
    pipe = load_pipeline(run)
    try:
        for name in PipelineOptions.FROM_SEGMENTATION:
            assert getattr(pipe.opt, name) == getattr(RUN_SEG, name), name
    finally:
        pipe.close()


def test_explicit_option_wins_even_when_equal_to_the_old_default(run):
    pipe = load_pipeline(run, options=PipelineOptions(test_grid=(12, 12), rw_squarings=6))
    try:
        assert pipe.opt.test_grid == (12, 12) and pipe.opt.rw_squarings == 6
        assert pipe.opt.kmeans_iters == RUN_SEG.kmeans_iters
    finally:
        pipe.close()


def test_old_run_folder_is_segmented_with_its_config_settings(tmp_path):
    folder = _legacy(make_run(tmp_path / "old"), {"test_grid": [8, 8], "rw_squarings": 2})
    pipe = load_pipeline(folder)
    try:
        assert pipe.opt.test_grid == (8, 8) and pipe.opt.rw_squarings == 2
    finally:
        pipe.close()


def test_pipeline_built_directly_uses_the_defaults(run):
    be = load_backend(run)
    pipe = pipeline_mod.Pipeline(be, be.manifest.preprocess, be.manifest.classes,
                                 be.manifest.palette)
    assert pipe.opt.rw_squarings == SegmentationConfig().rw_squarings
    assert pipe.opt.test_grid == SegmentationConfig().test_grid


def _spy_options(monkeypatch) -> list[PipelineOptions]:
    seen: list[PipelineOptions] = []
    real = pipeline_mod.Pipeline.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.opt)

    monkeypatch.setattr(pipeline_mod.Pipeline, "__init__", spy)
    return seen


def test_segment_cli_uses_the_models_settings_unless_given(run, tmp_path, monkeypatch):
    from spml_deploy.cli import main

    src = _images(tmp_path / "in")
    seen = _spy_options(monkeypatch)
    main(["segment", str(run), str(src), str(tmp_path / "a"), "--refine", "--quiet"])
    main(["segment", str(run), str(src), str(tmp_path / "b"), "--refine", "--quiet",
          "--test-grid", "12", "12", "--rw-squarings", "6", "--knn-k", "20"])
    assert (seen[0].test_grid, seen[0].rw_squarings, seen[0].knn_k) == ((8, 8), 2, 5)
    assert (seen[1].test_grid, seen[1].rw_squarings, seen[1].knn_k) == ((12, 12), 6, 20)
    assert seen[1].rw_beta == RUN_SEG.rw_beta               # not given: still the model's
    assert len(list((tmp_path / "a" / "labels").glob("*.png"))) == 2


def test_segment_cli_verifies_the_model_once(run, tmp_path, monkeypatch):
    from spml_deploy.cli import main

    src = _images(tmp_path / "in")
    hashed = Counter()
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p, *a: hashed.update([Path(p).name])
                        or real(p, *a))
    main(["segment", str(run), str(src), str(tmp_path / "out"), "--quiet"])
    assert hashed == Counter({"weights.pt": 1, "config.json": 1})


def test_export_verifies_once_and_copies_the_segmentation(run, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from spml_deploy.export.bundle import export_bundle

    hashed = Counter()
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p, *a: hashed.update([str(p)])
                        or real(p, *a))
    reads = []
    real_load = bundle_mod.load_weights
    monkeypatch.setattr(bundle_mod, "load_weights", lambda p: reads.append(p) or real_load(p))
    out = tmp_path / "bundle"
    export_bundle(run, out, imgsz=64, parity_images=1, compare_half=False)
    assert hashed[str(run / "weights.pt")] == 1 and hashed[str(run / "config.json")] == 1
    assert len(reads) == 1
    b = load_bundle(out)
    assert b.kind == "bundle" and b.segmentation == RUN_SEG
    from spml_deploy.artifacts import read_onnx_manifest

    assert read_onnx_manifest(out / "model.onnx").segmentation == RUN_SEG
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes((out / "model.onnx").read_bytes())
    onnx_only = load_bundle(bare / "model.onnx")
    assert onnx_only.segmentation == RUN_SEG and onnx_only.model_file("onnx", "x") == \
        bare / "model.onnx"
    pipe = load_pipeline(out, backend="onnxruntime")
    try:
        assert pipe.opt.test_grid == (8, 8) and pipe.opt.rw_squarings == 2
    finally:
        pipe.close()


def test_bundle_model_file_names_the_export_command(run):
    with pytest.raises(ManifestError, match="this run folder has no model.onnx") as exc:
        load_bundle(run).model_file("onnx", "model.onnx")
    assert "spml-deploy export" in str(exc.value)
    assert isinstance(load_bundle(run), Bundle)
