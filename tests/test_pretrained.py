"""``train.pretrained=imagenet``: torchvision's weights through the torch hub cache, offline.

A small state dict in torchvision layout (resnet18 stem and stage 2, plus an ``fc``) is saved
under a name with its own sha256 prefix and served through a ``file://`` folder
(``SPML_PRETRAINED_URL``) into a temporary hub cache (``TORCH_HOME``). Nothing touches the
internet.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from spml_deploy.engine import pretrained
from spml_deploy.config import MODEL_PRESETS, ModelConfig
from spml_deploy.errors import ConfigError
from spml_deploy.engine.model import build_model
from spml_deploy.engine.resnet import build_backbone

PARTS = ("conv1.", "bn1.", "layer1.")


def _fake_state() -> dict[str, torch.Tensor]:
    """Stem + stage 2 of a torchvision resnet18 with random values (and an fc to be ignored)."""
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v + 3)
          for k, v in build_backbone("resnet18", stem="torchvision").state_dict().items()
          if k.startswith(PARTS)}
    sd["fc.weight"] = torch.zeros(1000, 512)
    return sd


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A served folder with a correctly named resnet18 file, a fresh hub cache, the file table
    pointing at that name. Returns (served folder, file name, state dict)."""
    served = tmp_path / "served"
    served.mkdir()
    state = _fake_state()
    tmp = served / "tmp.pth"
    torch.save(state, tmp)
    name = f"resnet18-{_sha256(tmp)[:8]}.pth"
    tmp.rename(served / name)
    monkeypatch.setitem(pretrained.IMAGENET_FILES, "resnet18", name)
    monkeypatch.setenv(pretrained.URL_ENV, served.as_uri() + "/")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)      # get_dir() follows TORCH_HOME
    return served, name, state


def _cfg(name: str) -> ModelConfig:
    return ModelConfig(**{**MODEL_PRESETS[name], "num_classes": 5})


def test_official_urls(monkeypatch):
    monkeypatch.delenv(pretrained.URL_ENV, raising=False)
    assert (pretrained.imagenet_url("resnet50")
            == "https://download.pytorch.org/models/resnet50-0676ba61.pth")
    assert pretrained.imagenet_url("resnet101").endswith("/resnet101-63fe2227.pth")
    monkeypatch.setenv(pretrained.URL_ENV, "http://mirror.example/models")
    assert (pretrained.imagenet_url("resnet18")
            == "http://mirror.example/models/resnet18-f37072fd.pth")
    with pytest.raises(ConfigError, match="no ImageNet weights for the 'tiny' backbone") as exc:
        pretrained.imagenet_url("tiny")
    assert "resnet18, resnet50, resnet101" in str(exc.value)
    # any other value is a local path, returned as it is (read_pretrained checks it)
    assert pretrained.pretrained_file("w/r50.pth", "resnet50") == Path("w/r50.pth")


def test_imagenet_loads_into_the_backbone_and_cache_is_reused(hub, tmp_path, monkeypatch):
    served, name, state = hub
    net, _ = build_model(_cfg("resnet18"), pretrained="imagenet")
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / name
    assert cached.is_file() and cached.read_bytes() == (served / name).read_bytes()
    b = net.backbone
    assert b.stem == "torchvision" and b.frozen          # stem follows the file, spec-6 freeze
    own = b.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k
    assert not torch.equal(own["layer2.0.conv1.weight"],
                           torch.zeros_like(own["layer2.0.conv1.weight"]))   # keeps its init

    # second call: the served folder is gone and the URL unreachable; the cache is read
    (served / name).unlink()
    monkeypatch.setenv(pretrained.URL_ENV, (tmp_path / "nowhere").as_uri())
    assert pretrained.fetch_imagenet("resnet18") == cached
    net2, _ = build_model(_cfg("resnet18"), pretrained="imagenet")
    assert torch.equal(net2.backbone.state_dict()["layer1.1.conv2.weight"],
                       state["layer1.1.conv2.weight"])


def test_corrupt_download_is_refused(hub, tmp_path):
    served, name, _ = hub
    (served / name).write_bytes((served / name).read_bytes()[:-7] + b"garbage")
    with pytest.raises(ConfigError, match="does not match its checksum") as exc:
        pretrained.fetch_imagenet("resnet18")
    text = str(exc.value)
    assert name in text and "--set train.pretrained=/path/to/resnet18.pth" in text
    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    assert list(checkpoints.iterdir()) == []       # nothing kept, not even a partial file


@pytest.mark.parametrize("base", ["file", "http"])
def test_offline_gives_one_clear_message(hub, tmp_path, monkeypatch, base):
    url = (tmp_path / "nowhere").as_uri() if base == "file" else "http://127.0.0.1:9/models"
    monkeypatch.setenv(pretrained.URL_ENV, url)
    with pytest.raises(ConfigError) as exc:
        pretrained.fetch_imagenet("resnet18")
    text = str(exc.value)
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / hub[1]
    assert f"{url}/{hub[1]}" in text                 # the URL
    assert str(cached) in text                       # where the file would be read from
    assert "--set train.pretrained=/path/to/resnet18.pth" in text    # the local alternative
    assert not cached.exists()


def test_cli_offline_exit_code_2(hub, tmp_path, monkeypatch, capsys):
    """Through the command line: checked before any training, one message, exit code 2."""
    from spml_deploy.cli import main
    from spml_deploy.data.synth import synthesize

    synthesize(tmp_path / "scenes", n_train=2, n_val=1, size=64)
    monkeypatch.setenv(pretrained.URL_ENV, (tmp_path / "nowhere").as_uri())
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(tmp_path / "scenes"), "--preset", "resnet18", "--out",
              str(tmp_path / "run"), "--set", "train.pretrained=imagenet", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "cannot download the ImageNet weights of resnet18" in err
    assert not (tmp_path / "run").exists()      # refused before the run folder is written
