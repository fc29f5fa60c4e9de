"""Dilated ResNet backbones of the embedding network (spec section 2): residual blocks, stems,
presets.

Backbone choices
----------------
* ``resnet18`` (basic blocks [2, 2, 2, 2]), ``resnet50`` / ``resnet101`` (bottleneck blocks
  [3, 4, 6, 3] / [3, 4, 23, 3]), ``tiny`` (basic blocks, one per stage, widths w-2w-4w-8w with
  w = ``ModelConfig.width`` (default 16), for CPU tests and the demo).
* Stem ``deep`` (spec: 3x3/2 conv 3->64, 3x3 64->64, 3x3 64->128, each + BN + ReLU, 3x3/2
  max-pool; tiny: w, w, w channels) or ``torchvision`` (7x7/2 conv 3->64 + BN + ReLU + max-pool),
  which is the only stem that torchvision's ImageNet weights fit. The stem is taken from
  ``ModelConfig.stem`` when that field exists ("" = auto); auto means ``deep`` (the spec),
  except that :func:`spml_deploy.engine.model.build_model` given a pretrained file follows the
  file's layout (torchvision file -> torchvision stem). An explicit stem that contradicts the
  file is a :class:`ConfigError`.
* Bottlenecks put the stride on the 3x3 convolution (torchvision "v1.5"), so torchvision weights
  mean what they meant in ImageNet training. Stage strides [1, 2, 1, 1]; stage 4 (``layer3``)
  dilation 1 in its first block and 2 in the others, stage 5 (``layer4``) 2 then 4. A bottleneck
  has one 3x3 convolution, which takes the block's dilation; a basic block's first block in a
  dilated stage uses the previous dilation in its first 3x3 convolution and the new one in its
  second, which is exactly what the strided (ImageNet) network computed. Output stride 8.
* Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.downsample.0``, ...; the deep
  stem adds ``conv2/bn2/conv3/bn3``), so a torchvision state dict loads without renaming.
"""
from __future__ import annotations

from torch import Tensor, nn

from spml_deploy.config import BACKBONES
from spml_deploy.errors import ConfigError

STEMS = ("deep", "torchvision")
TINY_DEFAULT_WIDTH = 16

# name -> (block type, blocks per stage); widths are the stage's 3x3 widths (bottleneck: x4 out)
_ARCH: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "tiny": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


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
