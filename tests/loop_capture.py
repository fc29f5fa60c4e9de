"""Deterministic inputs for the three training loops and a recorder of what each loop feeds its
network and its optimizer, so that the loops can be compared with values recorded earlier
(``tests/assets/training_loops_reference.npz``; see ``tests/test_training_loops.py``)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from spml_deploy.config import RunConfig, preset
from spml_deploy.data.imageio import write_label_png

REFERENCE = Path(__file__).parent / "assets" / "training_loops_reference.npz"
SIZES = ((40, 52), (61, 33), (24, 24))
C = 4


def make_inputs(root: Path) -> list[SimpleNamespace]:
    """Three images (PNG RGB), their label maps (classes 0..3, VOID) and region maps."""
    rng = np.random.default_rng(20240611)
    out = []
    for i, (h, w) in enumerate(SIZES):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        lab = rng.choice(np.array([0, 1, 2, 3, 4, 255], np.uint8), (h, w))
        reg = rng.integers(0, 30, (h, w)).astype(np.uint8)
        paths = [root / f"im{i}.png", root / f"lab{i}.png", root / f"reg{i}.png"]
        Image.fromarray(img).save(paths[0])
        write_label_png(paths[1], lab)
        write_label_png(paths[2], reg)
        out.append(SimpleNamespace(stem=f"im{i}", path=paths[0], image=paths[0], label=paths[1],
                                   region=paths[2], tags=(1 + i % 3,), file_name=paths[0].name))
    return out


def small_config() -> RunConfig:
    """The tiny preset with a 16 px crop, batch 2, warm-up 3 over 8 steps."""
    cfg = preset("points", "tiny", C)
    return replace(cfg, train=replace(cfg.train, crop=16, batch=2, warmup=3, iters=8,
                                      cam_iters=5, lr=0.01, seed=5))


class Recorder:
    """Patches ``torch.optim.Optimizer.zero_grad`` to record each group's learning rate at every
    step (the loops set it just before)."""

    def __init__(self, monkeypatch: Any):
        self.lrs: list[list[float]] = []
        orig = torch.optim.Optimizer.zero_grad

        def zero_grad(opt, *a, **k):
            self.lrs.append([float(g["lr"]) for g in opt.param_groups])
            return orig(opt, *a, **k)

        monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", zero_grad)


class _Net(torch.nn.Module):
    """A stand-in embedding network recording its inputs; unit-free embeddings [B, D, h/4, w/4]."""

    def __init__(self, dim: int):
        super().__init__()
        self.backbone = torch.nn.Conv2d(3, dim, 4, stride=4)
        self.head = torch.nn.Identity()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.backbone(x)


def capture(root: Path, monkeypatch: Any) -> dict[str, np.ndarray]:
    """What each loop sees: learning rates per step and group, and its first batches."""
    from spml_deploy.training import cam as cam_mod
    from spml_deploy.training.classifier import train_classifier
    from spml_deploy.training.trainset import StepSampler, TrainSet
    from spml_deploy.training.train import Trainer

    items = make_inputs(root)
    cfg = small_config()
    res: dict[str, np.ndarray] = {}

    # the embedding loop: its sampler + dataset, and the schedule its Trainer applies
    tset = TrainSet(items, cfg, C, cfg.train.seed)
    keys = list(StepSampler(len(items), cfg.train.batch, 0, 3, cfg.train.seed))
    samples = [tset[k] for k in keys]
    for name in ("image", "label", "region", "tags"):
        res[f"train_{name}"] = torch.stack([s[name] for s in samples]).numpy()
    for sched in ("poly", "cosine"):
        c = replace(cfg, train=replace(cfg.train, schedule=sched, iters=40, warmup=10))
        trainer = Trainer(c, C, torch.device("cpu"))
        rec = []
        for step in (0, 1, 5, 9, 10, 11, 25, 39, 40):
            trainer.schedule.apply(trainer.opt, step)
            rec.append([g["lr"] for g in trainer.opt.param_groups])
        res[f"train_lr_{sched}"] = np.array(rec)

    # the classifier loop on frozen embeddings
    net = _Net(cfg.model.embed_dim)
    lrs = Recorder(monkeypatch)
    pairs = [(it.image, it.label) for it in items]
    torch.manual_seed(0)
    train_classifier(net, pairs, cfg, C, torch.device("cpu"), iters=6, seed=2, progress=False)
    res["classifier_lr"] = np.array(lrs.lrs)
    res["classifier_x"] = torch.cat(net.inputs[:3]).numpy()

    # the CAM classifier
    lrs.lrs.clear()
    seen: list[torch.Tensor] = []
    orig_forward = cam_mod.CamNet.forward

    def forward(self, x):
        seen.append(x.detach().clone())
        return orig_forward(self, x)

    monkeypatch.setattr(cam_mod.CamNet, "forward", forward)
    cam_mod.train_cam(items, cfg.model, cfg.train, "cpu", root / "cam.pt", progress=False,
                      preprocess=cfg.preprocess)
    res["cam_lr"] = np.array(lrs.lrs)
    res["cam_x"] = torch.cat(seen[:3]).numpy()
    return res

