"""ImageNet weights for the ResNet presets: ``train.pretrained = imagenet`` or a local file.

``imagenet`` fetches torchvision's ImageNet-1k ResNet weights for the preset's backbone (the
``IMAGENET1K_V1`` files of ``ResNet18/50/101_Weights``; torchvision itself is not needed)
through :func:`torch.hub.load_state_dict_from_url`: they are downloaded once into the torch hub
cache (``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints`` by default) and
checked against the sha256 prefix in their file name; later runs read the cached file without
the network. ``SPML_PRETRAINED_URL`` replaces the download folder (a mirror, or a ``file://``
folder holding the same file names). Any other value is the path of a local state dict
(torchvision layout, see :func:`spml_deploy.engine.model.read_pretrained`).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from spml_deploy.errors import ConfigError

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
