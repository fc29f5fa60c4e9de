"""The SPML training loop (``spml-deploy train``): embedding network + jointly trained f0.

One step (spec sections 3-6): embeddings of a batch of augmented crops, per-image spherical
k-means, segments split by (cluster, weak label, region), the four relationship losses against
the current segments and the memory bank, plus the cross-entropy of the classifier f0 trained on
detached embeddings (``compat.joint_classifier``). Baselines: ``pce`` trains the same network
and classifier end to end with cross-entropy on the labelled pixels of the weak labels only,
then goes through the same pseudo-label and final-classifier stages as SPML; ``ce`` trains end
to end on the full masks and stops there.

The run folder holds ``config.json`` (resolved), ``checkpoint.pt`` (weights + optimizer + step,
for ``--resume``), ``weights.pt`` (weights only), ``train_log.jsonl`` and ``spml.json``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spml_deploy.artifacts import (Manifest, atomic_torch_save, atomic_write_text, load_weights,
                                   provenance, write_manifest)
from spml_deploy.config import RunConfig, from_dict, to_dict
from spml_deploy.data.dataset import Dataset
from spml_deploy.data.kinds import kinds_of, needs_cams, preferred
from spml_deploy.engine.model import SegmentationModel
from spml_deploy.errors import ConfigError, TrainingError
from spml_deploy.evaluation.model_scores import score_model
from spml_deploy.training.schedule import LRSchedule, make_optimizer

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "weights.pt"
CONFIG = "config.json"
LOG = "train_log.jsonl"


def has_final_stages(cfg: RunConfig) -> bool:
    """Whether a run goes on after the embedding with pseudo labels, the final classifier and
    the prototype memory: SPML and the partial cross-entropy baseline (so that the two are
    compared with the same stages), not the full-mask baseline, whose labels need no pseudo
    labels; ``train.classifier_iters = 0`` turns the stages off."""
    return cfg.train.baseline != "ce" and cfg.train.classifier_iters > 0


def backbone_lr_mult(cfg: RunConfig) -> float:
    """The backbone's learning-rate multiplier: spec 6's x1 protects pretrained weights; a
    backbone trained from scratch (the tiny preset, or no ``--pretrained``) learns at x10."""
    if cfg.train.backbone_lr_mult > 0:
        return cfg.train.backbone_lr_mult
    return 1.0 if cfg.train.pretrained else 10.0


def _ce(logits: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cross-entropy on logits upsampled to the label size; VOID and UNL (>= C) ignored."""
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    target = torch.where(label >= num_classes, torch.full_like(label, -100), label)
    if not (target >= 0).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=-100)


class TrainModule(torch.nn.Module):
    """Network + classifier f0 in one module (what DistributedDataParallel wraps).

    forward(x) -> (raw embeddings [B, D, h, w], f0 logits [B, C, h, w]); f0 sees detached unit
    embeddings for SPML (pitfall 14) and the live ones for the cross-entropy baselines.
    """

    def __init__(self, net: torch.nn.Module, f0: torch.nn.Module, detach: bool):
        super().__init__()
        self.net, self.f0, self.detach = net, f0, detach

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.net(x)
        phi = F.normalize(e, dim=1, eps=1e-12)
        return e, self.f0(phi.detach() if self.detach else phi)


class Trainer:
    """Holds model, classifier, optimizer and memory; ``step`` runs one iteration."""

    def __init__(self, cfg: RunConfig, num_classes: int, device: torch.device,
                 distributed: bool = False):
        from spml_deploy.engine.model import build_model, param_groups

        self.cfg, self.C, self.device = cfg, num_classes, device
        self.net, self.f0 = build_model(cfg.model, pretrained=cfg.train.pretrained or None)
        ce_dropout = getattr(cfg.train, "ce_dropout", -1.0)
        if cfg.train.baseline == "ce" and ce_dropout >= 0:
            self.f0.dropout.p = ce_dropout       # f0 is the network's output layer here
        self.module = TrainModule(self.net, self.f0, detach=not cfg.train.baseline).to(device)
        self.ddp = self.module
        if distributed:
            if device.type == "cuda":   # synchronised batch norm across devices (spec section 2)
                self.module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
                self.net, self.f0 = self.module.net, self.module.f0
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None)
        groups = param_groups(self.net, self.f0, cfg.train.lr, cfg.train.weight_decay,
                              backbone_mult=backbone_lr_mult(cfg))
        self.opt = make_optimizer(groups, cfg.train)
        self.schedule = LRSchedule.of(cfg.train)
        self.memory = None
        if not cfg.train.baseline:
            from spml_deploy.training.spml_loss import MemoryBank

            self.memory = MemoryBank(cfg.segmentation.memory_size)

    def train_mode(self) -> None:
        self.net.train()     # the backbone keeps a frozen stem/res2 in eval mode itself
        self.f0.train()

    def step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        from spml_deploy.engine.prototypes import resize_labels_nearest

        cfg, C = self.cfg, self.C
        x = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        self.schedule.apply(self.opt, step)
        e, logits = self.ddp(x)                                    # [B, D, h, w] raw, f0 logits
        out: dict[str, torch.Tensor] = {}
        if cfg.train.baseline:
            ce = _ce(logits, label, C)                             # end to end: gradient into net
            loss = ce
            out["CE"] = ce
        else:
            from spml_deploy.training.spml_loss import spml_losses

            h, w = e.shape[-2:]
            lab_d = resize_labels_nearest(label, (h, w))
            reg_d = resize_labels_nearest(batch["region"].to(self.device), (h, w))
            res = spml_losses(e, lab_d, reg_d, batch["tags"].to(self.device), cfg.loss,
                              cfg.segmentation, cfg.compat, self.memory, C)
            loss = res["loss"]
            out.update({k: res[k] for k in ("L_I", "L_A", "L_C", "L_O") if k in res})
            ce = _ce(logits, label, C)                             # f0 on detached embeddings
            out["CE_f0"] = ce
            loss = loss + (cfg.loss.lambda_a if cfg.compat.joint_classifier else 1.0) * ce
        out["loss"] = loss
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at step {step} "
                f"({', '.join(f'{k}={float(v.detach()):.4g}' for k, v in out.items())}); "
                "the last good checkpoint is kept",
                fix="lower --lr or check the annotations; resume with --resume")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {k: float(v.detach()) for k, v in out.items()}

    def state(self, step: int) -> dict[str, Any]:
        st = {"net": self.net.state_dict(), "f0": self.f0.state_dict(),
              "optimizer": self.opt.state_dict(), "step": step}
        if self.memory is not None:
            st["memory"] = self.memory.state_dict()
        return st

    def load_state(self, st: dict[str, Any]) -> int:
        self.net.load_state_dict(st["net"])
        self.f0.load_state_dict(st["f0"])
        self.opt.load_state_dict(st["optimizer"])
        if self.memory is not None and "memory" in st:
            self.memory.load_state_dict(st["memory"])
        return int(st["step"])


def resolve_config(num_classes: int, supervision: str, preset_name: str, config_file: Path | None,
                   overrides: dict[str, Any]) -> RunConfig:
    """Preset for (supervision, network size), then the config file, then command-line values."""
    from spml_deploy.config import (apply_official_loss_scale, load_config_file, override,
                                    preset)

    cfg = preset(supervision, preset_name, num_classes)
    if config_file is not None:
        cfg = override(cfg, load_config_file(config_file), "config")
    cfg = override(cfg, overrides, "config")
    if cfg.compat.official_loss_scale:
        cfg = apply_official_loss_scale(cfg)
    check_train_values(cfg)
    LRSchedule.of(cfg.train)        # an unknown train.schedule fails before any training
    if cfg.train.crop % 8:
        raise ConfigError(f"crop {cfg.train.crop} must be a multiple of 8",
                          fix=f"use --crop {cfg.train.crop // 8 * 8 or 8}")
    from spml_deploy.engine.index import INDEX_TYPES

    if cfg.segmentation.memory_index not in INDEX_TYPES:
        raise ConfigError(f"segmentation.memory_index '{cfg.segmentation.memory_index}' is not an "
                          f"index type", fix=f"choose one of {', '.join(INDEX_TYPES)} "
                          "(flat = exact search, the default)")
    if cfg.train.crf:
        from spml_deploy.engine.crf import require_crf

        require_crf()       # before any training, not after it at the pseudo-label stage
    if cfg.train.pretrained:    # download (or fail) before any data preparation or training
        from spml_deploy.engine.pretrained import pretrained_file

        if not pretrained_file(cfg.train.pretrained, cfg.model.backbone).is_file():
            raise ConfigError("pretrained weights file not found", path=cfg.train.pretrained,
                              fix="give the path of a local ImageNet ResNet state dict "
                                  "(train.pretrained), or train.pretrained=imagenet")
    if cfg.model.num_classes != num_classes:
        cfg = replace(cfg, model=replace(cfg.model, num_classes=num_classes))
    if cfg.preprocess.max_side == 512 and cfg.train.crop != 512:
        # test-time size follows the training crop (spec 7.1: 512 crop -> longest side 512)
        cfg = replace(cfg, preprocess=replace(cfg.preprocess, max_side=cfg.train.crop))
    return cfg


# (key, smallest value, whether the smallest value itself is allowed) of train values that
# --config and --set can change; the command-line options check the same at parse time.
_TRAIN_MINIMA = (("iters", 1, True), ("batch", 1, True), ("crop", 8, True), ("lr", 0, False),
                 ("workers", 0, True), ("val_every", 0, True), ("seed", 0, True),
                 ("classifier_iters", 0, True), ("cam_iters", 0, True), ("warmup", 0, True),
                 ("log_every", 1, True), ("ckpt_every", 1, True), ("weight_decay", 0, True),
                 ("momentum", 0, True))


def check_train_values(cfg: RunConfig) -> None:
    """:class:`ConfigError` naming the key when a train value is out of its range."""
    for key, low, closed in _TRAIN_MINIMA:
        value = getattr(cfg.train, key)
        if value < low or (value == low and not closed):
            bound = f">= {low}" if closed else f"> {low}"
            raise ConfigError(f"train.{key} = {value} is out of range: it must be {bound}",
                              fix=f"set train.{key} to a value {bound} (--set train.{key}=..., "
                                  "the --config file, or the matching option)")


def _plan(cfg: RunConfig, n_images: int, label_kind: str, final: bool) -> str:
    """The stages of a run and their budgets, printed before training starts; ``final``: the
    run goes on with pseudo labels, the final classifier and the prototype memory."""
    t = cfg.train
    stages = []
    if needs_cams(label_kind):
        stages.append(f"CAM classifier for the {label_kind}, {t.cam_iters} steps")
    what = f"{t.baseline} baseline" if t.baseline else "SPML embedding"
    stages.append(f"{what}, {t.iters} steps (batch {t.batch}, lr {t.lr:g})")
    if final:
        head = "f1 then f2" if label_kind == "tags" else "f1"
        stages += ["pseudo labels", f"final classifier {head}, {t.classifier_iters} steps"
                   + (" each" if label_kind == "tags" else ""), "prototype memory for kNN"]
    return (f"training on {n_images} images; stages: "
            + "; ".join(f"{i}) {x}" for i, x in enumerate(stages, 1)))


def _train_records(dataset: Dataset, split: str) -> list:
    """The training images; :class:`TrainingError` saying how to provide them when none."""
    if not dataset.images:
        raise TrainingError("the dataset has no images to train on", path=dataset.root,
                            fix="add images and their entries in annotations.json "
                                "('spml-deploy data check DATASET' shows what it holds)")
    if split != "all" and split not in dataset.splits:
        raise TrainingError(f"the dataset has no training images: splits/{split}.txt is "
                            "missing", path=dataset.root,
                            fix=f"list the training image stems in splits/{split}.txt, or train "
                                "on every image with --set train.train_split=all")
    records = dataset.split(split)
    if not records:
        raise TrainingError(f"the dataset has no training images: splits/{split}.txt is empty",
                            path=dataset.root, fix="list the training image stems in it")
    return records


def evaluate_f0(net, f0, dataset: Dataset, split: str, cfg: RunConfig, device) -> dict[str, Any]:
    """mIoU of f0's predictions on a split with masks (same scoring code as ``spml-deploy eval``;
    :func:`spml_deploy.evaluation.model_scores.score_model`)."""
    net.eval()
    f0.eval()
    return score_model(SegmentationModel(net, f0), cfg.preprocess, dataset, split, device=device)


def train(dataset_root: Path, supervision: str, out: Path, *, preset_name: str = "tiny",
          config_file: Path | None = None, overrides: dict[str, Any] | None = None,
          device: str = "cpu", resume: bool = False, progress: bool = True,
          echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train SPML embeddings (or a baseline) on ``dataset_root``; write the run folder ``out``.

    ``echo``: where to print the stages and their budgets (and the step a resume starts from)."""
    from spml_deploy.data.dataset import load_dataset

    from spml_deploy.training import distributed as dist_utils

    info = dist_utils.from_environment()
    dataset = load_dataset(dataset_root, check_files=True)
    C = dataset.num_classes
    out = Path(out)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available",
                          fix="use --device cpu")
    if info.enabled and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    dist_utils.init(info, dev)

    if resume:
        if not (out / CONFIG).is_file():
            raise ConfigError("--resume: no config.json in the run folder", path=out,
                              fix="start a new run without --resume")
        cfg = from_dict(RunConfig, json.loads((out / CONFIG).read_text()))
    else:
        if (out / CHECKPOINT).exists() or (out / WEIGHTS).exists():
            raise ConfigError("the run folder already holds a run", path=out,
                              fix="pass --resume to continue it, or choose another --out")
        cfg = resolve_config(C, supervision, preset_name, config_file, overrides or {})
    records = _train_records(dataset, cfg.train.train_split)
    if cfg.train.batch % info.world:
        raise ConfigError(f"batch {cfg.train.batch} is not divisible by the {info.world} processes",
                          fix=f"use --batch {cfg.train.batch // info.world * info.world or info.world}")
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        atomic_write_text(out / CONFIG, json.dumps(to_dict(cfg), indent=2) + "\n")
    sup = cfg.train.supervision
    label_kind = "full" if cfg.train.baseline == "ce" else sup
    if label_kind == "full" and "full" not in _kinds(dataset):
        raise TrainingError("full supervision needs masks/<stem>.png; the dataset has none",
                            path=dataset_root,
                            fix=f"use --supervision with one of: {', '.join(_kinds(dataset))}")

    torch.manual_seed(cfg.train.seed)
    say = echo if (echo is not None and info.is_main) else log.info
    say(_plan(cfg, len(records), label_kind, final=has_final_stages(cfg)))
    cams = None
    from spml_deploy.training.trainset import StepSampler, TrainSet, prepare

    if info.is_main:     # the other processes wait, then read the cached label maps and regions
        if needs_cams(label_kind):
            cams = _cams(dataset, records, cfg, out, dev, progress)
        items = prepare(dataset, records, label_kind, cfg, out / "cache", device, cams, progress)
    dist_utils.barrier()
    if not info.is_main:
        items = prepare(dataset, records, label_kind, cfg, out / "cache", device, None, False)
    progress = progress and info.is_main
    trainer = Trainer(cfg, C, dev, distributed=info.enabled)
    start = 0
    if resume and (out / CHECKPOINT).is_file():
        start = trainer.load_state(load_weights(out / CHECKPOINT))
        say(f"resuming from step {start} of {cfg.train.iters} ({out / CHECKPOINT})")
    elif resume:
        say(f"resuming: no {CHECKPOINT} yet, starting at step 0 of {cfg.train.iters}")
    if start >= cfg.train.iters:
        say(f"embedding training already complete ({start} steps); finishing the later stages")
    tset = TrainSet(items, cfg, C, cfg.train.seed)
    sampler = StepSampler(len(items), cfg.train.batch, start, cfg.train.iters, cfg.train.seed,
                          rank=info.rank, world=info.world)
    loader = torch.utils.data.DataLoader(
        tset, batch_size=cfg.train.batch // info.world, sampler=sampler, num_workers=cfg.train.workers,
        pin_memory=dev.type == "cuda", drop_last=False,
        persistent_workers=cfg.train.workers > 0)
    trainer.train_mode()
    bar = tqdm(total=cfg.train.iters, initial=start, desc=f"train {sup}"
               + (f" ({cfg.train.baseline} baseline)" if cfg.train.baseline else ""),
               disable=not progress, unit="it", dynamic_ncols=True)
    t0, step = time.perf_counter(), start
    val_every = cfg.train.val_every
    has_val = cfg.train.val_split in dataset.splits
    last_val = None
    with open(out / LOG, "a") if info.is_main else open(os.devnull, "w") as logf:
        for batch in loader:
            terms = trainer.step(batch, step)
            step += 1
            bar.update(1)
            if not info.is_main:
                continue
            bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items() if k != "loss"}, refresh=False)
            if step % cfg.train.log_every == 0 or step == cfg.train.iters:
                rate = (step - start) / max(time.perf_counter() - t0, 1e-9)
                rec = {"step": step, "lr": trainer.schedule.at(step - 1), "it_s": round(rate, 3), **terms}
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            if val_every and has_val and (step % val_every == 0 or step == cfg.train.iters):
                scores = evaluate_f0(trainer.net, trainer.f0, dataset, cfg.train.val_split, cfg, dev)
                last_val = {"step": step, "miou": scores["miou"]}
                logf.write(json.dumps({"step": step, "val_miou": scores["miou"]}) + "\n")
                logf.flush()
                if scores["miou"] is not None:      # None: no masks in the val split
                    bar.write(f"step {step}: val mIoU {100 * scores['miou']:.2f}")
                trainer.train_mode()
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.iters:
                atomic_torch_save(trainer.state(step), out / CHECKPOINT)
    bar.close()
    dist_utils.barrier()
    if not info.is_main:     # rank 0 writes the run folder and runs the pseudo-label stages
        return {"run": str(out), "steps": step, "val": None, "rank": info.rank}
    if step > start:
        atomic_torch_save(trainer.state(step), out / CHECKPOINT)
    weights = {"net": trainer.net.state_dict(), "f0": trainer.f0.state_dict()}
    extra: dict[str, str] = {}
    if has_final_stages(cfg):
        # Pseudo labels -> f1 (f2 for tags) -> prototype memory; each stage resumable.
        from spml_deploy.training.pseudo import CLASSIFIER, finish_run

        extra = finish_run(out, cfg, C, trainer.net, trainer.f0, items,
                           {r.stem: r for r in records}, dev, progress)
        weights["f1"] = load_weights(out / CLASSIFIER)["f1"]
    atomic_torch_save(weights, out / WEIGHTS)
    final_val = None
    if has_val:
        from spml_deploy.engine.model import PixelClassifier

        clf = trainer.f0
        if "f1" in weights:
            clf = PixelClassifier(cfg.model.embed_dim, C, 0.0).to(dev)
            clf.load_state_dict(weights["f1"])
        scores = evaluate_f0(trainer.net, clf, dataset, cfg.train.val_split, cfg, dev)
        final_val = {"classifier": "f1" if "f1" in weights else "f0", "miou": scores["miou"]}
    manifest = write_run_manifest(out, dataset, cfg, step, final_val or last_val,
                                  {k: extra[k] for k in ("memory", "memory_index") if k in extra})
    return {"run": str(out), "steps": step, "val": final_val or last_val, "f0_val": last_val,
            "manifest": str(manifest)}


def write_run_manifest(out: Path, dataset: Dataset, cfg: RunConfig, step: int,
                       val: dict[str, Any] | None, extra_files: dict[str, str] | None = None) -> Path:
    from spml_deploy.data.imageio import default_palette

    m = Manifest(kind="run", model=cfg.model, preprocess=cfg.preprocess,
                 segmentation=cfg.segmentation, classes=list(dataset.class_names),
                 palette=[list(c) for c in default_palette(dataset.num_classes)],
                 training={"supervision": cfg.train.supervision, "baseline": cfg.train.baseline,
                           "steps": step, "dataset": str(dataset.root), "val": val},
                 provenance=provenance())
    for role, rel in {"weights": WEIGHTS, "config": CONFIG, **(extra_files or {})}.items():
        if (out / rel).is_file():
            m.add_file(out, role, rel)
    return write_manifest(out, m)


def _kinds(dataset: Dataset) -> list[str]:
    """The supervision kinds the dataset's annotations provide, weak kinds first."""
    return preferred(kinds_of(k for k, n in dataset.annotation_kinds().items() if n))


def _cams(dataset: Dataset, records, cfg: RunConfig, out: Path, dev, progress: bool) -> dict:
    """Fit (or reuse) the multi-label CAM classifier and compute CAMs for ``records``."""
    from spml_deploy.training.cam import compute_cams, load_cam_model, train_cam

    path = train_cam(records, cfg.model, cfg.train, dev, out / "cache" / "cam.pt", progress=progress)
    model = load_cam_model(path, cfg.model, dev)
    from spml_deploy.data.imageio import read_image

    cams = {}
    for rec in tqdm(records, desc="class activation maps", disable=not progress, leave=False):
        cams[rec.stem] = compute_cams(model, read_image(rec.path), rec, cfg.preprocess, dev)
    return cams
