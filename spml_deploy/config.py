"""Frozen configuration dataclasses and presets.

Presets follow ``shared/spec/ALGORITHM.md`` section 8 (the paper's values; the official code's
values are reachable through ``compat.official_loss_scale``). Every value can be overridden from a
YAML/JSON file; unknown keys fail with the closest valid name.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from spml_deploy.data.kinds import SUPERVISIONS
from spml_deploy.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VOID = 255

BACKBONES = ("tiny", "resnet18", "resnet50", "resnet101")


@dataclass(frozen=True)
class ModelConfig:
    """Embedding network: backbone -> head -> x2 upsampling -> D-dim embeddings (stride 4)."""

    backbone: str = "tiny"
    embed_dim: int = 64
    head: str = "aspp"
    aspp_dilations: tuple[int, ...] = (6, 12, 18, 24)
    output_stride: int = 8          # backbone stride; embeddings are at output_stride / 2
    num_classes: int = 2            # classes including background (class 0)
    classifier_dropout: float = 0.75  # f0 (jointly trained); the stand-alone f1 uses 0.65
    width: int = 0                  # tiny backbone base width (0 = preset default)
    stem: str = ""                  # "" = automatic (deep; torchvision when its weights are loaded)
    bn_momentum: float = 0.0        # 0 = automatic (3e-4 with pretrained weights, 0.1 from scratch)
    decoder: str = ""               # "" = spec: ASPP sum + bilinear x2; "fpn" = light stride-4 decoder
    decoder_channels: int = 64      # channels of the "fpn" decoder

    @property
    def embed_stride(self) -> int:
        return self.output_stride // 2


@dataclass(frozen=True)
class PreprocessConfig:
    """How images are turned into network input. Travels with the weights (spml.json)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color_order: str = "RGB"
    scale: float = 1.0 / 255.0
    pad_multiple: int = 8
    max_side: int = 512             # test-time: longest side resized to this (0 = keep size)


@dataclass(frozen=True)
class CompatConfig:
    """Switches reproducing the official implementation (spec section 0.1)."""

    unlabeled_as_void: bool = False
    nearest_subsample: bool = True
    zero_centroid_for_empty: bool = True
    subtractive_positive_sum: bool = False
    set_empty_tag_double_count: bool = False
    disable_feature_affinity: bool = False
    joint_classifier: bool = True
    official_loss_scale: bool = False
    official_batch: bool = False
    classifier_on_upsampled_embedding: bool = True


@dataclass(frozen=True)
class LossConfig:
    """Concentrations (kappa) and weights (lambda) of the four relationships (spec section 5)."""

    kappa_i: float = 16.0
    kappa_a: float = 6.0
    kappa_c: float = 12.0
    kappa_o: float = 12.0
    lambda_i: float = 0.1
    lambda_a: float = 1.0
    lambda_c: float = 0.5
    lambda_o: float = 0.0


@dataclass(frozen=True)
class SegmentationConfig:
    """K-means and inference settings (spec sections 3 and 7)."""

    train_grid: tuple[int, int] = (6, 6)
    test_grid: tuple[int, int] = (12, 12)
    kmeans_iters: int = 10
    memory_size: int = 2            # previous iterations kept in the prototype memory bank
    rw_beta: float = 5.0
    rw_alpha: float = 20.0
    rw_squarings: int = 6
    knn_k: int = 20
    memory_index: str = "flat"      # FAISS index the prototype memory is saved as (flat = exact)


@dataclass(frozen=True)
class TrainConfig:
    supervision: str = "points"
    baseline: str = ""              # "" (SPML), "pce" (partial CE on labelled pixels), "ce" (full masks)
    iters: int = 30000
    batch: int = 12
    crop: int = 512
    lr: float = 3e-3
    optimizer: str = "sgd"          # "sgd" (spec 6: momentum, poly decay) or "adamw" (same schedule)
    schedule: str = "poly"          # "poly" (spec 6: (1 - t/T)^0.9) or "cosine"; both after warm-up
    ce_dropout: float = -1.0        # f0's dropout with --baseline ce (< 0: model.classifier_dropout)
    backbone_lr_mult: float = 0.0   # 0 = automatic: x1 with pretrained weights, x10 from scratch
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: int = 100
    scale_range: tuple[float, float] = (0.5, 1.5)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    val_every: int = 0
    classifier_iters: int = 4000
    cam_iters: int = 2000
    scribble_width: int = 3
    point_dilation: int = 6
    cam_alpha: float = 6.0
    cam_threshold: float = 0.2
    box_threshold: float = 0.5
    overseg: str = "felzenszwalb"
    overseg_regions: int = 256      # at most this many over-segmentation regions per image
    crf: bool = False               # DenseCRF on the pseudo labels (spec 7.4/7.5; optional package)
    pretrained: str = ""            # "imagenet" (downloaded), a local state dict, "" = scratch
    workers: int = 0                # data-loading worker processes (0 = in the training process)
    train_split: str = "train"
    val_split: str = "val"


@dataclass(frozen=True)
class RunConfig:
    """Everything ``spml-deploy train`` needs; saved resolved in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)


# Paper values (spec section 8). Official-code loss scale in OFFICIAL_LOSS.
LOSS_PRESETS: dict[str, LossConfig] = {
    "full": LossConfig(16, 6, 12, 12, 0.1, 1.0, 0.5, 0.0),
    "scribbles": LossConfig(16, 6, 12, 12, 0.1, 1.0, 0.5, 0.0),
    "points": LossConfig(16, 6, 8, 12, 1.0, 1.0, 1.0, 0.0),
    "boxes": LossConfig(16, 6, 8, 12, 0.3, 1.0, 1.0, 0.0),
    "tags": LossConfig(16, 6, 8, 12, 0.3, 1.0, 1.0, 0.0),
}
OFFICIAL_LOSS: dict[str, tuple[float, float, float]] = {
    "full": (0.1, 1.0, 0.5),
    "scribbles": (0.1, 1.0, 0.5),
    "points": (0.1, 0.1, 0.1),
    "boxes": (0.1, 0.3, 0.3),
    "tags": (0.1, 0.3, 0.3),
}
BATCH_PRESETS = {"full": 16, "scribbles": 12, "points": 12, "boxes": 16, "tags": 16}

# Network size presets. `tiny` is for CPU tests and the demo; the resnets follow spec section 2.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(backbone="tiny", embed_dim=32, aspp_dilations=(2, 4, 6, 8), width=16),
    "resnet18": dict(backbone="resnet18", embed_dim=64),
    "resnet50": dict(backbone="resnet50", embed_dim=64),
    "resnet101": dict(backbone="resnet101", embed_dim=64),
}
# Training-size presets that go with the network presets (the paper's schedule for resnets).
TRAIN_SIZE_PRESETS: dict[str, dict[str, Any]] = {
    # 128 px scenes: 32 regions keep the region size of VOC's 256 regions on ~500 px images.
    # Trained from scratch, the tiny network needs a 10x higher learning rate and >= 600
    # iterations to leave the all-background solution (benchmarks/results/accuracy_points.md).
    # ce_dropout: with full masks f0 is the network's own output layer, trained end to end;
    # the spec's 0.75 (meant for f0 on detached features) slows it down
    # (benchmarks/results/recipe_search.md: 44.4 vs 40.3 val mIoU after 4000 iterations).
    "tiny": dict(iters=1200, lr=0.03, batch=8, crop=128, ckpt_every=200, classifier_iters=200,
                 cam_iters=200, overseg_regions=32, ce_dropout=0.0),
    "resnet18": dict(iters=30000, crop=512),
    "resnet50": dict(iters=30000, crop=512),
    "resnet101": dict(iters=30000, crop=512),
}
# Segmentation settings that depend on the image size. The random walk runs on the stride-8
# grid: the spec's 6 squarings (64 steps) are meant for ~62x62 cells (500 px images); the tiny
# preset's 128 px images give 16x16 cells, where 64 steps spread a class ~4x further across the
# image and wash out small objects. 2 squarings (4 steps) keep the spec's spread relative to
# the grid (steps ~ side^2: 64 * (16/62)^2 = 4); measured on the built-in scenes in
# benchmarks/results/recipe_search.md.
SEGMENTATION_SIZE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(rw_squarings=2),
}


def preset(supervision: str = "points", model: str = "tiny", num_classes: int = 2) -> RunConfig:
    """The resolved preset for a supervision kind and a network size."""
    if supervision not in SUPERVISIONS:
        raise ConfigError(f"unknown supervision '{supervision}'",
                          fix=f"choose one of {', '.join(SUPERVISIONS)}")
    if model not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset '{model}'", fix=f"choose one of {', '.join(MODEL_PRESETS)}")
    loss = LOSS_PRESETS[supervision]
    train = TrainConfig(supervision=supervision, batch=BATCH_PRESETS[supervision])
    train = replace(train, **TRAIN_SIZE_PRESETS[model])
    return RunConfig(
        model=ModelConfig(num_classes=num_classes, **MODEL_PRESETS[model]),
        loss=loss,
        segmentation=SegmentationConfig(**SEGMENTATION_SIZE_PRESETS.get(model, {})),
        train=train,
    )


def apply_official_loss_scale(cfg: RunConfig) -> RunConfig:
    """lambda_I, lambda_A, lambda_C of the released scripts (``compat.official_loss_scale``)."""
    li, la, lc = OFFICIAL_LOSS[cfg.train.supervision]
    return replace(cfg, loss=replace(cfg.loss, lambda_i=li, lambda_a=la, lambda_c=lc))


# --------------------------------------------------------------------------------------------
# dict <-> dataclass, with "did you mean" for unknown keys


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(value: Any, current: Any, where: str) -> Any:
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    if isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(current, str) and isinstance(value, str):
        return value
    raise ConfigError(f"{where} has the wrong type: expected {type(current).__name__}, got {value!r}")


def override(obj: Any, changes: dict[str, Any], where: str = "config") -> Any:
    """Return a copy of dataclass ``obj`` with ``changes`` (nested dicts) applied.

    Unknown keys raise :class:`ConfigError` naming the closest valid key.
    """
    if not isinstance(changes, dict):
        raise ConfigError(f"{where} must be a mapping, got {changes!r}")
    names = {f.name: f for f in fields(obj)}
    updates = {}
    for key, value in changes.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{where}.{key}'", fix=hint)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            updates[key] = override(current, value, f"{where}.{key}")
        else:
            updates[key] = _coerce(value, current, f"{where}.{key}")
    return replace(obj, **updates)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from a (possibly partial) nested dict."""
    return override(cls(), data, cls.__name__)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON override file into a dict (errors name the file and the line)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file ({exc.strerror})", path=p) from exc
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                              path=p) from exc
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}", path=p) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("a config file must hold a mapping of sections", path=p,
                          fix="write e.g. 'train: {iters: 1000}'")
    return data
