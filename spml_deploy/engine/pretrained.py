"""ImageNet weights for the ResNet presets: ``train.pretrained = imagenet`` or a local file.

``imagenet`` fetches torchvision's ImageNet-1k ResNet weights for the preset's backbone (the
``IMAGENET1K_V1`` files of ``ResNet18/50/101_Weights``; torchvision itself is not needed)
through :func:`torch.hub.load_state_dict_from_url`: they are downloaded once into the torch hub
cache (``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints`` by default) and
checked against the sha256 prefix in their file name; later runs read the cached file without
the network. ``SPML_PRETRAINED_URL`` replaces the download folder (a mirror, or a ``file://``
folder holding the same file names). Any other value is the path of a local state dict
(torchvision layout, see :func:`read_pretrained`).

Loading: :func:`read_pretrained` reads a local state dict into torchvision names,
:func:`resolve_stem` picks the stem the file's layout needs, :func:`load_pretrained_backbone`
copies the weights into an :class:`spml_deploy.engine.model.EmbeddingNet`'s backbone and, by
default, freezes its stem and stage 2 (spec 6).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from spml_deploy.config import ModelConfig
from spml_deploy.engine.resnet import STEMS
from spml_deploy.errors import ConfigError

if TYPE_CHECKING:
    from spml_deploy.engine.model import EmbeddingNet

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
BASE_URL = "https://download.pytorch.org/models/"
URL_ENV = "SPML_PRETRAINED_URL"
# torchvision's ResNet{18,50,101}_Weights.IMAGENET1K_V1 (file name = name-<sha256 prefix>.pth)
IMAGENET_FILES: dict[str, str] = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
}


def _local_fix(backbone: str) -> str:
    return f"--set train.pretrained=/path/to/{backbone}.pth (a torchvision state dict)"


def _file_name(backbone: str) -> str:
    if backbone not in IMAGENET_FILES:
        raise ConfigError(f"there are no ImageNet weights for the '{backbone}' backbone",
                          fix=f"use a preset with ImageNet weights ({', '.join(IMAGENET_FILES)}), "
                              "or leave train.pretrained empty to train from scratch")
    return IMAGENET_FILES[backbone]


def imagenet_url(backbone: str) -> str:
    """Download URL of ``backbone``'s ImageNet weights (``SPML_PRETRAINED_URL`` replaces the
    folder part)."""
    base = os.environ.get(URL_ENV) or BASE_URL
    return base.rstrip("/") + "/" + _file_name(backbone)


def imagenet_cache_path(backbone: str) -> Path:
    """Where the torch hub cache keeps (or will keep) ``backbone``'s ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _file_name(backbone)


def fetch_imagenet(backbone: str) -> Path:
    """Path of ``backbone``'s ImageNet weights in the torch hub cache, downloaded if absent.

    The download is checked against the file name's sha256 prefix and written atomically (a
    failed or corrupt download leaves nothing in the cache). Raises :class:`ConfigError` when the
    file cannot be fetched (offline, unreachable URL, wrong checksum), naming the URL, the cache
    path and the local-file alternative.
    """
    cached = imagenet_cache_path(backbone)
    if cached.is_file():
        return cached
    url = imagenet_url(backbone)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the torch hub cache folder ({exc.strerror or exc})",
                          path=cached.parent,
                          fix=f"set TORCH_HOME to a writable folder, or "
                              f"{_local_fix(backbone)}") from exc
    log.info("downloading the ImageNet weights of %s from %s to %s", backbone, url, cached)
    try:
        torch.hub.load_state_dict_from_url(url, model_dir=str(cached.parent), map_location="cpu",
                                           progress=sys.stderr.isatty(), check_hash=True,
                                           file_name=cached.name, weights_only=True)
    except RuntimeError as exc:
        if "invalid hash value" not in str(exc):
            raise ConfigError(f"the ImageNet weights downloaded from {url} cannot be read "
                              f"({str(exc).splitlines()[0]})", path=cached,
                              fix=f"delete {cached} and retry, or {_local_fix(backbone)}") from exc
        raise ConfigError(f"the file downloaded from {url} does not match its checksum "
                          f"({exc}); it was not kept", path=None,
                          fix=f"retry, check that {URL_ENV} (if set) points at torchvision's "
                              f"files, or {_local_fix(backbone)}") from exc
    except OSError as exc:   # URLError, HTTPError, socket errors and time-outs
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise ConfigError(f"cannot download the ImageNet weights of {backbone} from {url} "
                          f"({reason}); they are read from the torch hub cache at {cached} "
                          f"once downloaded",
                          fix=f"connect to the internet and retry, copy {cached.name} to {cached} "
                              f"(TORCH_HOME sets the cache folder), or train from a local file: "
                              f"{_local_fix(backbone)}") from exc
    return cached


def pretrained_file(value: str | Path, backbone: str) -> Path:
    """The local file a ``train.pretrained`` value stands for: ``imagenet`` -> the cached
    torchvision weights of ``backbone`` (fetched if needed), anything else -> that path."""
    if str(value).strip().lower() == IMAGENET:
        return fetch_imagenet(backbone)
    return Path(value)


def resolve_stem(cfg: ModelConfig, pretrained: str | Path | None = None) -> str:
    """The stem to build: ``cfg.stem`` when set, else the pretrained file's layout, else deep."""
    wanted = getattr(cfg, "stem", "") or ""
    if wanted and wanted not in STEMS:
        raise ConfigError(f"unknown model.stem '{wanted}'", fix=f"choose one of {', '.join(STEMS)}")
    if not pretrained:
        return wanted or "deep"
    pretrained = pretrained_file(pretrained, cfg.backbone)
    found = _stem_of(read_pretrained(pretrained), pretrained)
    if wanted and wanted != found:
        raise ConfigError(f"the pretrained weights have a {found} stem but model.stem is '{wanted}'",
                          path=pretrained, fix=f"set model.stem to '{found}' (or '' for automatic)")
    if not wanted and found != "deep":
        log.info("pretrained weights %s have a %s stem; building that stem", pretrained, found)
    return found


# ------------------------------------------------------------------------------------------
# reading and loading a pretrained state dict

_EXPECTED_LAYOUT = ("a torchvision ResNet state dict (conv1.weight [64,3,7,7], bn1.*, layer1..layer4.*, "
                    "fc.* ignored) or a deep-stem one (conv1 [64,3,3,3], bn1, conv2, bn2, conv3, bn3, "
                    "layer1..layer4; 'stem.0/1/3/4/6/7' mmcv names accepted); saved with torch.save")
_MMCV_STEM = {"stem.0.": "conv1.", "stem.1.": "bn1.", "stem.3.": "conv2.", "stem.4.": "bn2.",
              "stem.6.": "conv3.", "stem.7.": "bn3."}
_PREFIXES = ("module.", "backbone.", "encoder.")


def read_pretrained(path: str | Path) -> dict[str, Tensor]:
    """A pretrained backbone state dict from a local file, keys normalised to torchvision names.

    Accepts a bare state dict or one under ``state_dict`` / ``model``; strips ``module.``,
    ``backbone.`` and ``encoder.`` prefixes, renames mmcv deep-stem keys and drops ``fc.*``.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError("pretrained weights file not found", path=p,
                          fix="give the path of a local ImageNet ResNet state dict (train.pretrained)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise ConfigError(f"cannot read pretrained weights ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})", path=p,
                          fix=f"expected {_EXPECTED_LAYOUT}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError("the file does not hold a state dict of tensors", path=p,
                          fix=f"expected {_EXPECTED_LAYOUT}")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        key = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        for old, new in _MMCV_STEM.items():
            if key.startswith(old):
                key = new + key[len(old):]
        if key.startswith("fc."):
            continue
        out[key] = value
    return out


def _stem_of(state: dict[str, Tensor], path: str | Path) -> str:
    w = state.get("conv1.weight")
    if w is None or w.dim() != 4:
        raise ConfigError("no stem convolution 'conv1.weight' in the pretrained weights", path=path,
                          fix=f"expected {_EXPECTED_LAYOUT}")
    if w.shape[-1] == 7:
        return "torchvision"
    return "deep" if "conv2.weight" in state else "torchvision"


def load_pretrained_backbone(net: EmbeddingNet, path: str | Path, freeze: bool = True) -> list[str]:
    """Load ImageNet weights into ``net.backbone``; returns the backbone keys left at init.

    Missing keys (other than ``num_batches_tracked``) are logged; shape mismatches, a stem that
    differs from the network's, or a file that matches nothing raise :class:`ConfigError` naming
    the file and the expected layout. ``freeze`` then freezes stem and stage 2 (spec 6).
    ``path`` may be ``imagenet`` (torchvision's weights for the backbone, see
    :func:`spml_deploy.engine.pretrained.pretrained_file`).
    """
    path = pretrained_file(path, net.cfg.backbone)
    state = read_pretrained(path)
    own = net.backbone.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise ConfigError(f"no key of the pretrained weights matches the backbone (file keys "
                          f"e.g. {sorted(state)[:3]})", path=path, fix=f"expected {_EXPECTED_LAYOUT}")
    found = _stem_of(state, path)
    if found != net.backbone.stem:
        raise ConfigError(f"the pretrained weights have a {found} stem but the network was built "
                          f"with a {net.backbone.stem} stem", path=path,
                          fix=f"build the model with stem='{found}' (build_model(cfg, pretrained=...) "
                              f"picks it from the file)")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in matched.items()
           if v.shape != own[k].shape]
    if bad:
        raise ConfigError(f"pretrained weights do not fit backbone '{net.cfg.backbone}': "
                          f"{len(bad)} shape mismatches, e.g. {'; '.join(bad[:3])}", path=path,
                          fix="choose the preset matching the file (resnet18/50/101)")
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(matched) if not k.endswith("num_batches_tracked"))
    if unexpected:
        log.warning("%s: %d unexpected keys ignored, e.g. %s", path, len(unexpected), unexpected[:5])
    if missing:
        log.warning("%s: %d backbone keys not in the file keep their init, e.g. %s",
                    path, len(missing), missing[:5])
    with torch.no_grad():
        for k, v in matched.items():
            own[k].copy_(v.to(own[k].dtype))
    log.info("loaded %d tensors of pretrained backbone weights from %s", len(matched), path)
    if freeze:
        net.backbone.freeze_stem_and_res2(True)
    return missing
