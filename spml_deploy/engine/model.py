"""Embedding network (spec section 2), pixel classifier (spec 7.1) and optimiser groups (spec 6).

``EmbeddingNet`` = dilated ResNet backbone (output stride 8) -> DeepLab-v2 ASPP head (four
dilated 3x3 convolutions, summed) -> bilinear x2 upsampling -> raw D-dim embeddings at stride 4.
``SegmentationModel`` wraps the network and the classifier into the export/inference graph:
image in, unit embeddings and class logits out.

The backbones (presets, stems, dilation plan) are in :mod:`spml_deploy.engine.resnet`, the
pretrained ImageNet weights (lookup, reading, loading) in :mod:`spml_deploy.engine.pretrained`.

Input height and width must be multiples of 8 (the pipeline pads, ``PreprocessConfig.pad_multiple``);
the embedding map is then exactly ``H/4 x W/4``.

Freezing (spec 6: stem and stage 2 not optimised) only makes sense for pretrained weights:
:func:`load_pretrained_backbone` freezes them by default, a network trained from scratch keeps
them trainable. Batch-norm momentum defaults to 3e-4 (spec) with pretrained weights and 0.1 from
scratch (3e-4 would leave the running statistics near their initial values for hundreds of steps).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spml_deploy.config import ModelConfig
from spml_deploy.errors import ConfigError
from spml_deploy.engine.pretrained import load_pretrained_backbone, resolve_stem
from spml_deploy.engine.resnet import ResNetBackbone, build_backbone

NORM_EPS = 1e-12
SPEC_BN_MOMENTUM = 3e-4       # spec section 2, PyTorch convention, for pretrained backbones
SCRATCH_BN_MOMENTUM = 0.1
INPUT_MULTIPLE = 8


def _cfg_get(cfg: ModelConfig, name: str, default: Any) -> Any:
    """A ModelConfig field that may not exist in older configs (``stem``, ``bn_momentum``)."""
    return getattr(cfg, name, default)


# ------------------------------------------------------------------------------------------
# head, embedding network, classifier


class ASPP(nn.Module):
    """DeepLab-v2 ASPP: sum of dilated 3x3 convs with bias, [B,C,h,w] -> [B,D,h,w], no BN/ReLU."""

    def __init__(self, cin: int, cout: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for c in self.convs:
            nn.init.normal_(c.weight, std=0.01)
            nn.init.zeros_(c.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out


class FPNHead(nn.Module):
    """Light FPN-style decoder (``model.decoder: fpn``): the ASPP sum at stride 8 (``channels``
    wide, + BN + ReLU) upsampled x2 and added to a 1x1 projection of the stage-2 features at
    stride 4, then 3x3 conv + BN + ReLU and a 1x1 conv (bias) to D.

    (stage-2 features [B,c_low,h,w], last-stage features [B,c_high,h/2,w/2]) -> [B,D,h,w].
    Only Conv, BatchNormalization, Relu, Resize and Add: exports like the spec head.
    """

    def __init__(self, c_low: int, c_high: int, channels: int, cout: int,
                 dilations: tuple[int, ...]):
        super().__init__()
        self.aspp = ASPP(c_high, channels, dilations)
        for c in self.aspp.convs:   # a normalised branch: He init instead of the spec's 0.01
            nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")
        self.bn_ctx = nn.BatchNorm2d(channels)
        self.lateral = nn.Conv2d(c_low, channels, 1, bias=False)
        self.bn_lateral = nn.BatchNorm2d(channels)
        self.fuse = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn_fuse = nn.BatchNorm2d(channels)
        self.out = nn.Conv2d(channels, cout, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        for m in (self.lateral, self.fuse):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.zeros_(self.out.bias)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        ctx = self.relu(self.bn_ctx(self.aspp(high)))
        # x2 exactly (inputs are multiples of 8); a scale factor keeps the ONNX graph dynamic
        ctx = F.interpolate(ctx, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.relu(ctx + self.bn_lateral(self.lateral(low)))
        return self.out(self.relu(self.bn_fuse(self.fuse(x))))


DECODERS = ("", "fpn")


class EmbeddingNet(nn.Module):
    """Images [B,3,H,W] (H, W multiples of 8) -> raw embeddings ``e`` [B,D,H/4,W/4].

    ``backbone`` gives the stride-8 feature map (``backbone.out_channels`` channels), ``head``
    the ASPP sum at stride 8; the x2 bilinear upsampling brings it to stride 4. No normalisation.
    With ``model.decoder: fpn`` the head is :class:`FPNHead`, which also reads the stride-4
    stage-2 features and outputs stride 4 itself (a configuration without the field builds
    the spec network, so older runs load unchanged).
    """

    def __init__(self, cfg: ModelConfig, stem: str | None = None, bn_momentum: float | None = None):
        super().__init__()
        if cfg.head != "aspp":
            raise ConfigError(f"unknown head '{cfg.head}'", fix="use model.head: aspp")
        if cfg.output_stride != 8:
            raise ConfigError(f"model.output_stride={cfg.output_stride} is not supported",
                              fix="use output_stride 8 (spec section 2)")
        if cfg.embed_dim < 1 or not cfg.aspp_dilations or min(cfg.aspp_dilations) < 1:
            raise ConfigError(f"invalid embed_dim {cfg.embed_dim} or aspp_dilations "
                              f"{cfg.aspp_dilations}", fix="positive values, e.g. 64 and [6,12,18,24]")
        decoder = _cfg_get(cfg, "decoder", "")
        if decoder not in DECODERS:
            raise ConfigError(f"unknown model.decoder '{decoder}'",
                              fix="use '' (spec: ASPP + bilinear x2) or 'fpn'")
        channels = _cfg_get(cfg, "decoder_channels", 64)
        if decoder and channels < 1:
            raise ConfigError(f"model.decoder_channels must be positive, got {channels}")
        self.cfg = cfg
        self.decoder = decoder
        stem = stem or _cfg_get(cfg, "stem", "") or "deep"
        self.backbone = build_backbone(cfg.backbone, stem, cfg.width)
        self.head: nn.Module
        if decoder == "fpn":
            self.head = FPNHead(self.backbone.low_channels, self.backbone.out_channels, channels,
                                cfg.embed_dim, tuple(cfg.aspp_dilations))
        else:
            self.head = ASPP(self.backbone.out_channels, cfg.embed_dim, tuple(cfg.aspp_dilations))
        momentum = bn_momentum or _cfg_get(cfg, "bn_momentum", 0.0) or SCRATCH_BN_MOMENTUM
        set_bn_momentum(self, momentum)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def forward(self, x: Tensor) -> Tensor:
        """Images [B,3,H,W] -> raw embeddings [B,D,H/4,W/4]."""
        if not (torch.jit.is_tracing() or torch.jit.is_scripting()
                or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
            h, w = x.shape[-2:]
            if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
                raise ConfigError(f"input size {h}x{w} is not a multiple of {INPUT_MULTIPLE}",
                                  fix="pad images to a multiple of 8 (PreprocessConfig.pad_multiple)")
        if self.decoder == "fpn":
            return self.head(*self.backbone.forward_features(x))
        e = self.head(self.backbone(x))
        return F.interpolate(e, scale_factor=2.0, mode="bilinear", align_corners=False)


class PixelClassifier(nn.Module):
    """Spec 7.1: unit embeddings [B,D,h,w] -> class logits [B,C,h,w].

    3x3 conv D->2D (no bias) -> BN -> ReLU -> Dropout (element-wise) -> 1x1 conv 2D->C (bias).
    """

    def __init__(self, embed_dim: int, num_classes: int, dropout: float = 0.75):
        super().__init__()
        if num_classes < 1 or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"invalid classifier num_classes={num_classes} dropout={dropout}",
                              fix="num_classes >= 1 and 0 <= dropout < 1")
        self.conv1 = nn.Conv2d(embed_dim, 2 * embed_dim, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * embed_dim)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(2 * embed_dim, num_classes, 1, bias=True)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.conv2.weight, std=0.01)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, phi: Tensor) -> Tensor:
        """Unit embeddings [B,D,h,w] -> logits [B,C,h,w]."""
        return self.conv2(self.dropout(self.relu(self.bn1(self.conv1(phi)))))


def unit_normalize(e: Tensor, dim: int = 1, eps: float = NORM_EPS) -> Tensor:
    """``e / max(||e||_2, eps)`` along ``dim`` with export-friendly ops (Mul, ReduceSum, Sqrt,
    Clip, Div). Inference only: the gradient of sqrt at an exactly-zero vector is not finite;
    training code should use ``torch.nn.functional.normalize`` (same values)."""
    norm = torch.sqrt((e * e).sum(dim=dim, keepdim=True)).clamp_min(eps)
    return e / norm


class SegmentationModel(nn.Module):
    """The export/inference graph: images [B,3,H,W] -> (phi [B,D,H/4,W/4] unit embeddings,
    logits [B,C,H/4,W/4]), both float32. The classifier sees the stride-4 unit embeddings.

    The network and the classifier run in the dtype of their weights (float32; float16 for a
    half-precision export, whose input is cast to it) or, under ``torch.autocast``, in
    autocast's dtype; the L2 normalisation always runs in float32. Every backend's torch path
    (the torch backend, the ONNX export, training's evaluation) calls this one forward pass.
    """

    def __init__(self, net: EmbeddingNet, classifier: PixelClassifier):
        super().__init__()
        self.net = net
        self.classifier = classifier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dtype = next(self.classifier.parameters()).dtype     # a Python constant when traced
        e = self.net(x if x.dtype == dtype else x.to(dtype))
        phi = unit_normalize(e if e.dtype == torch.float32 else e.float(), dim=1)
        logits = self.classifier(phi if dtype == torch.float32 else phi.to(dtype))
        return phi, logits if logits.dtype == torch.float32 else logits.float()


# ------------------------------------------------------------------------------------------
# construction, batch norm, optimiser groups


def set_bn_momentum(module: nn.Module, momentum: float) -> None:
    """Set the running-statistics momentum (PyTorch convention) of every batch norm."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def set_train_mode(net: nn.Module, mode: bool = True) -> nn.Module:
    """``net.train(mode)``; a frozen stem and stage 2 stay in eval mode (their batch norms keep
    the pretrained statistics). Works through wrappers (DDP, SyncBatchNorm conversion) because
    :meth:`ResNetBackbone.train` enforces it."""
    net.train(mode)
    for m in net.modules():
        if isinstance(m, ResNetBackbone) and m.frozen:
            assert all(not b.training for f in m.frozen_modules() for b in f.modules())
    return net


def build_model(cfg: ModelConfig, pretrained: str | Path | None = None,
                freeze: bool | None = None) -> tuple[EmbeddingNet, PixelClassifier]:
    """Embedding network and jointly trained classifier f0 for ``cfg``.

    With ``pretrained`` (a local ImageNet state dict, or ``imagenet`` for torchvision's weights
    of ``cfg.backbone``, downloaded once into the torch hub cache), the stem follows the file (see
    :func:`resolve_stem`), the weights are loaded, the network's BN momentum is the spec's 3e-4
    and stem + stage 2 are frozen (``freeze`` overrides). From scratch nothing is frozen and BN
    momentum is 0.1, unless ``cfg`` says otherwise (``bn_momentum`` field when present). The
    classifier, always trained from scratch, keeps PyTorch's default momentum 0.1. A resumed run
    or an inference session must rebuild with the same stem (and ``freeze`` for resuming).
    """
    stem = resolve_stem(cfg, pretrained)
    bn_momentum = _cfg_get(cfg, "bn_momentum", 0.0) or (
        SPEC_BN_MOMENTUM if pretrained else SCRATCH_BN_MOMENTUM)
    net = EmbeddingNet(cfg, stem=stem, bn_momentum=bn_momentum)
    if pretrained:
        load_pretrained_backbone(net, pretrained, freeze=True if freeze is None else freeze)
    elif freeze:
        net.backbone.freeze_stem_and_res2(True)
    classifier = PixelClassifier(cfg.embed_dim, cfg.num_classes, cfg.classifier_dropout)
    return net, classifier


def _named_trainable(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)


def param_groups(net: EmbeddingNet, classifier: nn.Module | None, base_lr: float,
                 weight_decay: float, backbone_mult: float = 1.0) -> list[dict[str, Any]]:
    """torch.optim parameter groups with the spec-6 multipliers (key ``lr_mult``; ``lr`` =
    base_lr * lr_mult, so a scheduler sets ``group['lr'] = lr_t * group['lr_mult']``).

    Names ending in ``weight`` (convolutions and BN scale) are weights, names ending in ``bias``
    (convolution biases and BN shift beta) are biases without weight decay:
    backbone weights x1, biases x2 (``backbone_mult`` replaces the x1: a backbone trained from
    scratch has nothing to preserve and learns at the head's rate); head weights x10, biases x20;
    classifier weights x10, biases x20. Frozen parameters (``requires_grad`` False) are left out; a backbone trained
    from scratch has its stem and stage 2 in the backbone groups. Empty groups are dropped.
    """
    spec = (("backbone", net.backbone, backbone_mult), ("head", net.head, 10.0))
    if classifier is not None:
        spec += (("classifier", classifier, 10.0),)
    covered: set[int] = set()
    groups = []
    for name, module, mult in spec:
        weights, biases = [], []
        for pname, p in _named_trainable(module):
            (biases if pname.endswith("bias") else weights).append(p)
            covered.add(id(p))
        if weights:
            groups.append(dict(params=weights, lr=base_lr * mult, lr_mult=mult,
                               weight_decay=weight_decay, name=f"{name}.weight"))
        if biases:
            groups.append(dict(params=biases, lr=base_lr * 2 * mult, lr_mult=2 * mult,
                               weight_decay=0.0, name=f"{name}.bias"))
    trainable = {id(p) for m in (net, classifier) if m is not None
                 for p in m.parameters() if p.requires_grad}
    assert covered == trainable, "every trainable parameter is in exactly one group"
    return groups


# ------------------------------------------------------------------------------------------
# FLOPs


def count_flops(cfg: ModelConfig, size: int | tuple[int, int] = 512, with_classifier: bool = False,
                stem: str | None = None) -> float:
    """Forward GFLOP per image (multiply-add = 2 FLOP; convolutions and matmuls, as counted by
    ``torch.utils.flop_counter``) of the embedding network (+ classifier) at ``size``."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = (size, size) if isinstance(size, int) else size
    with torch.device("meta"):   # shapes only: no memory, no arithmetic
        net = EmbeddingNet(cfg, stem=stem).eval()
        model: nn.Module = net
        if with_classifier:
            model = SegmentationModel(net, PixelClassifier(
                cfg.embed_dim, cfg.num_classes, cfg.classifier_dropout).eval())
        x = torch.empty(1, 3, h, w)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9
