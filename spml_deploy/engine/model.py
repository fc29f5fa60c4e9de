"""Embedding network (spec section 2), pixel classifier (spec 7.1) and optimiser groups (spec 6).

``EmbeddingNet`` = dilated ResNet backbone (output stride 8) -> DeepLab-v2 ASPP head (four
dilated 3x3 convolutions, summed) -> bilinear x2 upsampling -> raw D-dim embeddings at stride 4.
``SegmentationModel`` wraps the network and the classifier into the export/inference graph:
image in, unit embeddings and class logits out.

Backbone choices
----------------
* ``resnet18`` (basic blocks [2, 2, 2, 2]), ``resnet50`` / ``resnet101`` (bottleneck blocks
  [3, 4, 6, 3] / [3, 4, 23, 3]), ``tiny`` (basic blocks, one per stage, widths w-2w-4w-8w with
  w = ``ModelConfig.width`` (default 16), for CPU tests and the demo).
* Stem ``deep`` (spec: 3x3/2 conv 3->64, 3x3 64->64, 3x3 64->128, each + BN + ReLU, 3x3/2
  max-pool; tiny: w, w, w channels) or ``torchvision`` (7x7/2 conv 3->64 + BN + ReLU + max-pool),
  which is the only stem that torchvision's ImageNet weights fit. The stem is taken from
  ``ModelConfig.stem`` when that field exists ("" = auto); auto means ``deep`` (the spec), except
  that :func:`build_model` given a pretrained file follows the file's layout (torchvision file ->
  torchvision stem). An explicit stem that contradicts the file is a :class:`ConfigError`.
* Bottlenecks put the stride on the 3x3 convolution (torchvision "v1.5"), so torchvision weights
  mean what they meant in ImageNet training. Stage strides [1, 2, 1, 1]; stage 4 (``layer3``)
  dilation 1 in its first block and 2 in the others, stage 5 (``layer4``) 2 then 4. A bottleneck
  has one 3x3 convolution, which takes the block's dilation; a basic block's first block in a
  dilated stage uses the previous dilation in its first 3x3 convolution and the new one in its
  second, which is exactly what the strided (ImageNet) network computed. Output stride 8.
* Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.downsample.0``, ...; the deep
  stem adds ``conv2/bn2/conv3/bn3``), so a torchvision state dict loads without renaming.

Input height and width must be multiples of 8 (the pipeline pads, ``PreprocessConfig.pad_multiple``);
the embedding map is then exactly ``H/4 x W/4``.

Freezing (spec 6: stem and stage 2 not optimised) only makes sense for pretrained weights:
:func:`load_pretrained_backbone` freezes them by default, a network trained from scratch keeps
them trainable. Batch-norm momentum defaults to 3e-4 (spec) with pretrained weights and 0.1 from
scratch (3e-4 would leave the running statistics near their initial values for hundreds of steps).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spml_deploy.config import BACKBONES, ModelConfig
from spml_deploy.errors import ConfigError
from spml_deploy.engine.pretrained import pretrained_file

log = logging.getLogger(__name__)

STEMS = ("deep", "torchvision")
NORM_EPS = 1e-12
SPEC_BN_MOMENTUM = 3e-4       # spec section 2, PyTorch convention, for pretrained backbones
SCRATCH_BN_MOMENTUM = 0.1
TINY_DEFAULT_WIDTH = 16
INPUT_MULTIPLE = 8

# name -> (block type, blocks per stage); widths are the stage's 3x3 widths (bottleneck: x4 out)
_ARCH: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "tiny": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


def _cfg_get(cfg: ModelConfig, name: str, default: Any) -> Any:
    """A ModelConfig field that may not exist in older configs (``stem``, ``bn_momentum``)."""
    return getattr(cfg, name, default)


# ------------------------------------------------------------------------------------------
# residual blocks


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection ([B,cin,H,W] -> [B,width,H/s,W/s]).

    ``dilation`` applies to the first 3x3 convolution, ``dilation2`` (default: the same) to the
    second; a dilated stage's first block uses (previous, new) so that it computes exactly what
    the strided block computed (the "a trous" equivalence that keeps pretrained weights valid).
    """

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1,
                 dilation2: int | None = None):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv3x3(cin, width, stride, dilation)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, cout, 1, dilation if dilation2 is None else dilation2)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels) with a residual connection."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1,
                 dilation2: int | None = None):
        super().__init__()
        del dilation2  # one 3x3 convolution: ``dilation`` is the block's dilation
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


# ------------------------------------------------------------------------------------------
# backbone


class ResNetBackbone(nn.Module):
    """Dilated ResNet: [B,3,H,W] -> [B,out_channels,H/8,W/8] (H, W multiples of 8).

    Attributes: ``out_channels``, ``stem`` ("deep" | "torchvision"), ``frozen`` (stem and
    ``layer1`` excluded from optimisation, their batch norms kept in eval mode).
    """

    def __init__(self, block: str, layers: tuple[int, int, int, int], widths: tuple[int, ...],
                 stem: str = "deep", stem_channels: tuple[int, int, int] = (64, 64, 128)):
        super().__init__()
        if stem not in STEMS:
            raise ConfigError(f"unknown stem '{stem}'", fix=f"choose one of {', '.join(STEMS)}")
        self.stem = stem
        self.frozen = False
        block_cls = BasicBlock if block == "basic" else Bottleneck
        if stem == "deep":
            c1, c2, c3 = stem_channels
            self.conv1 = nn.Conv2d(3, c1, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c1)
            self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c2)
            self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(c3)
            cin = c3
        else:
            c1 = stem_channels[0]
            self.conv1 = nn.Conv2d(3, c1, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(c1)
            cin = c1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        # (stride, dilation of the first block, dilation of the other blocks) per stage 2..5
        plan = ((1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4))
        for i, (n, width, (stride, d_first, d_rest)) in enumerate(zip(layers, widths, plan)):
            blocks = []
            for b in range(n):
                if b == 0:
                    blocks.append(block_cls(cin, width, stride, d_first, d_rest))
                else:
                    blocks.append(block_cls(cin, width, 1, d_rest))
                cin = width * block_cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = cin
        self.low_channels = widths[0] * block_cls.expansion
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # zero-init the last BN of each residual branch: blocks start as (projected) identities,
        # which helps training from scratch; pretrained weights overwrite it.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def stem_modules(self) -> list[nn.Module]:
        """The stem's convolutions and batch norms (stage 1 of the spec)."""
        names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3") if self.stem == "deep" \
            else ("conv1", "bn1")
        return [getattr(self, n) for n in names]

    def frozen_modules(self) -> list[nn.Module]:
        """Stem + stage 2 (``layer1``): the part the spec freezes."""
        return self.stem_modules() + [self.layer1]

    def freeze_stem_and_res2(self, frozen: bool = True) -> None:
        """(Un)freeze stem and stage 2: ``requires_grad`` off and batch norms in eval mode."""
        self.frozen = frozen
        for m in self.frozen_modules():
            for p in m.parameters():
                p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ResNetBackbone":
        super().train(mode)
        if self.frozen:
            for m in self.frozen_modules():
                m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Images [B,3,H,W] -> features [B,out_channels,H/8,W/8]."""
        return self.forward_features(x)[1]

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] -> (stage-2 features [B,low_channels,H/4,W/4],
        last-stage features [B,out_channels,H/8,W/8])."""
        x = self.relu(self.bn1(self.conv1(x)))
        if self.stem == "deep":
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))
        low = self.layer1(self.maxpool(x))
        x = self.layer2(low)
        x = self.layer3(x)
        return low, self.layer4(x)


def build_backbone(name: str, stem: str = "deep", width: int = 0) -> ResNetBackbone:
    """A dilated (output stride 8) backbone by preset name (``tiny``, ``resnet18/50/101``)."""
    if name not in _ARCH:
        raise ConfigError(f"unknown backbone '{name}'", fix=f"choose one of {', '.join(BACKBONES)}")
    block, layers = _ARCH[name]
    if name == "tiny":
        w = width or TINY_DEFAULT_WIDTH
        if w < 1:
            raise ConfigError(f"model.width must be positive, got {width}")
        return ResNetBackbone(block, layers, (w, 2 * w, 4 * w, 8 * w), stem, (w, w, w))
    if width:
        raise ConfigError(f"model.width={width} only applies to the tiny backbone, not '{name}'",
                          fix="set model.width to 0")
    return ResNetBackbone(block, layers, (64, 128, 256, 512), stem, (64, 64, 128))


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


def resolve_stem(cfg: ModelConfig, pretrained: str | Path | None = None) -> str:
    """The stem to build: ``cfg.stem`` when set, else the pretrained file's layout, else deep."""
    wanted = _cfg_get(cfg, "stem", "") or ""
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
# pretrained ImageNet weights

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
