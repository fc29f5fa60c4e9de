"""Test fixture helper: a run folder as training writes it, without training.

``make_run(folder)`` builds the network of a preset (tiny by default) with random weights,
randomises the batch-norm statistics and the classifier so that the network is far from the
identity-like initialisation (so parity tests compare something that can differ: fused batch
norms, dilations, upsampling), saves ``weights.pt`` (``{"net", "f0"[, "f1"]}``), ``config.json``
and ``spml.json`` (kind "run", files with sha256).

Usable from tests (``from runs import make_run``) and from benchmarks (add tests/ to sys.path).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spml_deploy.artifacts import Manifest, atomic_torch_save, provenance, write_manifest
from spml_deploy.config import preset as config_preset
from spml_deploy.config import to_dict
from spml_deploy.engine.model import PixelClassifier, build_model


def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    """Random (but well-conditioned) batch-norm statistics and affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=gen)
            m.bias.data = 0.1 * torch.randn(n, generator=gen)
            m.running_mean.data = 0.1 * torch.randn(n, generator=gen)
            m.running_var.data = 0.5 + torch.rand(n, generator=gen)


def make_run(folder: str | Path, num_classes: int = 4, preset: str = "tiny", seed: int = 0,
             *, with_f1: bool = False, index: bool = False) -> Path:
    """Write an untrained run folder to ``folder``; returns its path.

    ``with_f1`` adds a final classifier "f1" (different weights from "f0"); ``index`` adds a
    dummy prototype index file (role "index") that bundles must copy.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config_preset("points", preset, num_classes=num_classes)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net, f0 = build_model(cfg.model)
    _randomise(net, gen)
    _randomise(f0, gen)
    with torch.no_grad():
        f0.conv2.weight.normal_(0.0, 0.3, generator=gen)
        f0.conv2.bias.normal_(0.0, 0.1, generator=gen)
    state = {"net": net.state_dict(), "f0": f0.state_dict()}
    if with_f1:
        f1 = PixelClassifier(cfg.model.embed_dim, num_classes, 0.65)
        _randomise(f1, gen)
        with torch.no_grad():
            f1.conv2.weight.normal_(0.0, 0.3, generator=gen)
        state["f1"] = f1.state_dict()
    atomic_torch_save(state, folder / "weights.pt")
    (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    m = Manifest(kind="run", model=cfg.model, preprocess=cfg.preprocess,
                 segmentation=cfg.segmentation, classes=["background"] + [f"class{i}" for i in range(1, num_classes)],
                 palette=[[(37 * i) % 256, (91 * i) % 256, (151 * i) % 256]
                          for i in range(num_classes)],
                 training={"supervision": cfg.train.supervision, "steps": 0, "note": "untrained"},
                 provenance=provenance())
    m.add_file(folder, "weights", "weights.pt")
    m.add_file(folder, "config", "config.json")
    if index:
        (folder / "index").mkdir(exist_ok=True)
        rng = np.random.default_rng(seed)
        np.savez(folder / "index" / "prototypes.npz",
                 vectors=rng.standard_normal((8, cfg.model.embed_dim)).astype(np.float32),
                 labels=rng.integers(0, num_classes, 8))
        m.add_file(folder, "index", "index/prototypes.npz")
    write_manifest(folder, m)
    return folder
