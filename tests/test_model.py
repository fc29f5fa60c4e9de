"""Embedding network, classifier, optimiser groups, pretrained loading and ONNX export."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spml_deploy.config import MODEL_PRESETS, ModelConfig
from spml_deploy.errors import ConfigError
from spml_deploy.engine.model import (
    EmbeddingNet,
    FPNHead,
    PixelClassifier,
    SegmentationModel,
    build_model,
    count_flops,
    param_groups,
    set_train_mode,
    unit_normalize,
)
from spml_deploy.engine.pretrained import load_pretrained_backbone, read_pretrained
from spml_deploy.engine.resnet import build_backbone


def _cfg(name: str = "tiny", **kw) -> ModelConfig:
    return ModelConfig(**{**MODEL_PRESETS[name], "num_classes": 5, **kw})


def _randomize_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine parameters and running statistics, so eval-mode BN is not identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net, clf = build_model(_cfg())
    _randomize_bn(net)
    _randomize_bn(clf, 1)
    return net.eval(), clf.eval()


# ------------------------------------------------------------------------------------------
# shapes, normalisation, determinism


@pytest.mark.parametrize("size", [(64, 64), (96, 128), (40, 72), (136, 8 * 3)])
def test_tiny_shapes_stride4(tiny, size):
    net, clf = tiny
    h, w = size
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        feat = net.backbone(x)
        e = net(x)
        phi, logits = SegmentationModel(net, clf)(x)
    assert feat.shape == (2, net.backbone.out_channels, h // 8, w // 8)
    assert e.shape == (2, 32, h // 4, w // 4)
    assert phi.shape == e.shape and logits.shape == (2, 5, h // 4, w // 4)


@pytest.mark.parametrize("name,channels", [("resnet18", 512), ("resnet50", 2048),
                                           ("resnet101", 2048)])
def test_resnet_presets_output_stride(name, channels):
    torch.manual_seed(0)
    net = EmbeddingNet(_cfg(name)).eval()
    assert net.backbone.out_channels == channels and net.backbone.stem == "deep"
    # deep stem of the spec: 3x3/2 3->64, 3x3 64->64, 3x3 64->128
    b = net.backbone
    assert (b.conv1.weight.shape, b.conv1.stride) == ((64, 3, 3, 3), (2, 2))
    assert b.conv2.weight.shape == (64, 64, 3, 3) and b.conv3.weight.shape == (128, 64, 3, 3)
    with torch.no_grad():
        e = net(torch.randn(1, 3, 32, 24))
    assert e.shape == (1, 64, 8, 6)


def test_parameter_counts():
    # with the torchvision stem the backbones have exactly torchvision's parameter counts
    # (11,689,512 / 25,557,032 / 44,549,160) minus the 1000-class fc layer
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in build_backbone(n, "torchvision").parameters())
                  for n in ("resnet18", "resnet50", "resnet101")}
    assert counts == {"resnet18": 11_176_512, "resnet50": 23_508_032, "resnet101": 42_500_160}


def test_input_not_multiple_of_8_is_rejected(tiny):
    with pytest.raises(ConfigError, match="multiple of 8"):
        tiny[0](torch.randn(1, 3, 60, 64))


def test_phi_unit_norm_and_matches_reference(tiny):
    net, clf = tiny
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        phi, logits = SegmentationModel(net, clf)(x)
        e = net(x)
    norms = phi.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)
    torch.testing.assert_close(phi, F.normalize(e, dim=1, eps=1e-12))
    with torch.no_grad():
        torch.testing.assert_close(logits, clf(F.normalize(e, dim=1)))


def test_unit_normalize_floor():
    e = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    e[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])
    e[0, :, 0, 1] = torch.tensor([1e-13, 0.0, 0.0])     # norm below the floor: divided by 1e-12
    phi = unit_normalize(e)
    assert phi[0, :, 0, 0].tolist() == pytest.approx([0.6, 0.8, 0.0])
    assert phi[0, 0, 0, 1].item() == pytest.approx(0.1)
    assert torch.equal(phi[0, :, 1, :], torch.zeros(3, 2, dtype=torch.float64))


def test_eval_is_deterministic_and_dropout_only_in_train(tiny):
    net, clf = tiny
    model = SegmentationModel(net, clf).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        clf.train()
        try:
            la, lb = clf(a[0]), clf(a[0])
        finally:
            clf.eval()
    assert not torch.allclose(la, lb)


def test_channels_last_and_float64(tiny):
    net, _ = tiny
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = net(x)
        cl_net = copy.deepcopy(net).to(memory_format=torch.channels_last)
        out = cl_net(x.to(memory_format=torch.channels_last))
        out64 = copy.deepcopy(net).double()(x.double())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), ref, rtol=1e-4, atol=1e-5)


def test_pixel_classifier_structure():
    clf = PixelClassifier(16, 7, dropout=0.65)
    assert clf.conv1.weight.shape == (32, 16, 3, 3) and clf.conv1.bias is None
    assert clf.bn1.num_features == 32 and clf.dropout.p == 0.65
    assert clf.conv2.weight.shape == (7, 32, 1, 1) and clf.conv2.bias is not None
    assert clf.eval()(torch.randn(2, 16, 6, 10)).shape == (2, 7, 6, 10)
    with pytest.raises(ConfigError, match="dropout"):
        PixelClassifier(16, 7, dropout=1.0)


# ------------------------------------------------------------------------------------------
# dilation pattern: the OS8 network equals the strided (OS32) network "a trous"


@pytest.mark.parametrize("name", ["tiny", "resnet18", "resnet50", "resnet101"])
def test_dilation_pattern(name):
    b = build_backbone(name)
    first3x3 = (lambda blk: blk.conv1) if name in ("tiny", "resnet18") else (lambda blk: blk.conv2)
    assert first3x3(b.layer2[0]).stride == (2, 2)
    for layer, d_first, d_rest in ((b.layer1, 1, 1), (b.layer3, 1, 2), (b.layer4, 2, 4)):
        assert first3x3(layer[0]).stride == (1, 1)
        assert first3x3(layer[0]).dilation == (d_first, d_first)
        assert first3x3(layer[0]).padding == (d_first, d_first)
        for blk in layer[1:]:
            convs = [m for m in blk.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
            assert all(c.dilation == (d_rest, d_rest) and c.stride == (1, 1) for c in convs)


def _undilate(backbone: nn.Module, basic: bool) -> nn.Module:
    """The same weights as a plain strided ResNet (strides 1,2,2,2; no dilation): OS 32."""
    ref = copy.deepcopy(backbone)
    for layer in (ref.layer3, ref.layer4):
        for i, blk in enumerate(layer):
            for m in blk.modules():
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                    m.dilation, m.padding = (1, 1), (1, 1)
            if i == 0:
                (blk.conv1 if basic else blk.conv2).stride = (2, 2)
                blk.downsample[0].stride = (2, 2)
    return ref


@pytest.mark.parametrize("name,dtype,size", [("tiny", torch.float64, (96, 64)),
                                             ("resnet18", torch.float32, (64, 64))])
def test_dilated_equals_strided_network_a_trous(name, dtype, size):
    torch.manual_seed(0)
    b = build_backbone(name)
    _randomize_bn(b)
    b = b.eval().to(dtype)
    ref = _undilate(b, basic=True).eval()
    x = torch.randn(1, 3, *size, dtype=dtype)
    with torch.no_grad():
        dense, coarse = b(x), ref(x)
    assert dense.shape[-2:] == (size[0] // 8, size[1] // 8)
    assert coarse.shape[-2:] == (size[0] // 32, size[1] // 32)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(dense[..., ::4, ::4], coarse, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------
# freezing and optimiser groups (spec 6)


def test_freeze_stem_and_res2():
    torch.manual_seed(0)
    net, clf = build_model(_cfg(), freeze=True)
    b = net.backbone
    frozen = {id(p) for m in b.frozen_modules() for p in m.parameters()}
    assert frozen and all(not p.requires_grad for m in b.frozen_modules() for p in m.parameters())
    assert all(p.requires_grad for p in net.parameters() if id(p) not in frozen)
    set_train_mode(net, True)
    assert net.training and not b.bn1.training and not b.bn3.training and not b.layer1[0].bn1.training
    assert b.layer2[0].bn1.training and net.head.training
    stats = b.bn1.running_mean.clone(), b.layer1[0].bn1.running_var.clone()
    moving = b.layer2[0].bn1.running_mean.clone()
    net(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert torch.equal(stats[0], b.bn1.running_mean) and torch.equal(stats[1], b.layer1[0].bn1.running_var)
    assert not torch.equal(moving, b.layer2[0].bn1.running_mean)
    assert all(p.grad is None for m in b.frozen_modules() for p in m.parameters())
    assert b.layer2[0].conv1.weight.grad is not None
    # SyncBatchNorm conversion (multi-GPU) keeps the frozen part frozen and in eval mode
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)).train()
    assert isinstance(sync.backbone.bn1, torch.nn.SyncBatchNorm) and not sync.backbone.bn1.training
    assert not sync.backbone.layer1[0].bn2.weight.requires_grad
    assert sync.backbone.layer2[0].bn1.training


def _expected_mult(module_name: str, pname: str) -> tuple[float, bool]:
    """(lr multiplier, weight decay?) from spec 6, by parameter name."""
    base = 1.0 if module_name == "backbone" else 10.0
    is_bias = pname.endswith("bias")   # conv bias or BN shift
    return (2 * base if is_bias else base), not is_bias


@pytest.mark.parametrize("frozen", [True, False])
def test_param_groups_multipliers(frozen):
    torch.manual_seed(0)
    net, clf = build_model(_cfg(), freeze=frozen)
    base_lr, wd = 0.01, 5e-4
    groups = param_groups(net, clf, base_lr, wd)
    where = {id(p): g for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(where)        # no parameter twice
    named = [("backbone", n, p) for n, p in net.backbone.named_parameters()]
    named += [("head", n, p) for n, p in net.head.named_parameters()]
    named += [("classifier", n, p) for n, p in clf.named_parameters()]
    assert len(named) == len(list(net.parameters())) + len(list(clf.parameters()))
    n_frozen = 0
    for module_name, pname, p in named:
        if not p.requires_grad:
            assert id(p) not in where
            n_frozen += 1
            continue
        mult, decays = _expected_mult(module_name, pname)
        g = where[id(p)]
        assert g["lr_mult"] == mult and g["lr"] == pytest.approx(base_lr * mult), pname
        assert g["weight_decay"] == (wd if decays else 0.0), pname
    assert (n_frozen > 0) == frozen
    # the groups drive torch.optim: one SGD step moves each parameter by lr*mult*(g + wd*theta)
    params = [p for _, _, p in named if p.requires_grad]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    torch.optim.SGD(groups, lr=base_lr).step()
    for (module_name, pname, p), b0 in zip([t for t in named if t[2].requires_grad], before):
        mult, decays = _expected_mult(module_name, pname)
        expect = b0 - base_lr * mult * (1.0 + (wd * b0 if decays else 0.0))
        torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# pretrained weights: a torchvision-layout ResNet written here from torchvision's definition


class _TvBasic(nn.Module):
    expansion = 1

    def __init__(self, cin, w, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, w, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
                           if stride != 1 or cin != w else None)

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + idt)


class _TvBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, w, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, w, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.conv3 = nn.Conv2d(w, 4 * w, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * w)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, 4 * w, 1, stride, bias=False),
                                         nn.BatchNorm2d(4 * w)) if stride != 1 or cin != 4 * w else None)

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + idt)


class _TvResNet(nn.Module):
    """torchvision.models.resnet layout and forward (up to layer4), fc kept for the keys."""

    def __init__(self, block, layers):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (n, w) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, w, (1 if i == 0 else 2) if j == 0 else 1))
                cin = w * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, 1000)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@pytest.mark.parametrize("name,block,layers", [("resnet18", _TvBasic, (2, 2, 2, 2)),
                                               ("resnet50", _TvBottleneck, (3, 4, 6, 3))])
def test_load_torchvision_weights(tmp_path, name, block, layers):
    torch.manual_seed(0)
    tv = _TvResNet(block, layers)
    _randomize_bn(tv)
    path = tmp_path / f"{name}.pth"
    torch.save(tv.state_dict(), path)
    net, _ = build_model(_cfg(name), pretrained=path)      # stem follows the file
    b = net.backbone
    assert b.stem == "torchvision" and b.frozen
    own = b.state_dict()
    for k, v in tv.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k
    assert b.bn1.momentum == pytest.approx(3e-4)
    assert not b.layer1[0].conv1.weight.requires_grad and b.layer2[0].conv1.weight.requires_grad
    # the weights mean what they meant: the dilated OS8 backbone equals the torchvision
    # (OS32) network at every 4th position
    tv.eval(), net.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        dense, coarse = b(x), tv(x)
    assert dense.shape[-2:] == (8, 8) and coarse.shape[-2:] == (2, 2)
    torch.testing.assert_close(dense[..., ::4, ::4], coarse, rtol=1e-4, atol=1e-4)


def test_deep_stem_checkpoint_with_prefixes(tmp_path):
    """A deep-stem file in a checkpoint dict, DataParallel prefix, mmcv stem names, an fc."""
    torch.manual_seed(0)
    src = build_backbone("resnet18")
    _randomize_bn(src)
    names = {"conv1.": "stem.0.", "bn1.": "stem.1.", "conv2.": "stem.3.", "bn2.": "stem.4.",
             "conv3.": "stem.6.", "bn3.": "stem.7."}
    sd = {}
    for k, v in src.state_dict().items():
        for old, new in names.items():
            if k.startswith(old):
                k = new + k[len(old):]
        sd["module.backbone." + k] = v
    sd["module.fc.weight"] = torch.zeros(1000, 512)
    path = tmp_path / "deep.pth"
    torch.save({"state_dict": sd, "epoch": 90}, path)
    assert set(read_pretrained(path)) == set(src.state_dict())
    net, _ = build_model(_cfg("resnet18"), pretrained=path, freeze=False)
    assert net.backbone.stem == "deep" and not net.backbone.frozen
    for k, v in src.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k


def test_pretrained_errors(tmp_path):
    tv = _TvResNet(_TvBasic, (2, 2, 2, 2))
    good = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), good)
    with pytest.raises(ConfigError, match="not found"):
        build_model(_cfg("resnet18"), pretrained=tmp_path / "missing.pth")
    # explicit deep stem + torchvision file
    deep_net = EmbeddingNet(_cfg("resnet18"), stem="deep")
    with pytest.raises(ConfigError, match="torchvision stem") as exc:
        load_pretrained_backbone(deep_net, good)
    assert str(good) in str(exc.value)
    # wrong depth: resnet18 file into resnet50
    with pytest.raises(ConfigError, match="shape mismatches"):
        build_model(_cfg("resnet50"), pretrained=good)
    # keys of something else entirely
    net_tv = EmbeddingNet(_cfg("resnet18"), stem="torchvision")
    other = tmp_path / "other.pth"
    torch.save({"conv1.weight_orig": torch.zeros(3), "classifier.weight": torch.zeros(3)}, other)
    with pytest.raises(ConfigError, match="no key of the pretrained weights matches") as exc:
        load_pretrained_backbone(net_tv, other)
    assert "torchvision ResNet state dict" in str(exc.value) and str(other) in str(exc.value)
    with pytest.raises(ConfigError, match="no stem convolution 'conv1.weight'") as exc:
        build_model(_cfg("resnet18"), pretrained=other)
    assert "torchvision ResNet state dict" in str(exc.value)
    # a torchvision resnet18 file into the tiny network: every matching key has the wrong shape
    net_small = EmbeddingNet(_cfg("tiny"), stem="torchvision")
    with pytest.raises(ConfigError, match="shape mismatches"):
        load_pretrained_backbone(net_small, good)
    # not a torch file at all, and a pickled object that weights_only refuses
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read pretrained weights"):
        load_pretrained_backbone(net_tv, bad)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": _TvBasic(3, 3, 1)}, pickled)
    with pytest.raises(ConfigError, match="cannot read pretrained weights"):
        load_pretrained_backbone(net_tv, pickled)


# ------------------------------------------------------------------------------------------
# FLOPs


def test_count_flops_head_difference():
    # Two configs that differ only in D: the difference is the ASPP (4 convs 3x3 128->D at
    # stride 8, 2 FLOP per multiply-add) — hand computed.
    h, w = 128, 96
    a = count_flops(_cfg(embed_dim=32), (h, w))
    b = count_flops(_cfg(embed_dim=64), (h, w))
    expect = 2 * 4 * 128 * 32 * 9 * (h // 8) * (w // 8) / 1e9
    assert b - a == pytest.approx(expect, rel=1e-9)


def test_count_flops_resnet50_anchor():
    # issue 5 quotes 238 GFLOP/image for resnet50 OS8 + ASPP (D=64) at 512x512: the torchvision
    # stem gives that figure; the spec's deep stem adds its two extra 3x3 convs at stride 2.
    tv = count_flops(_cfg("resnet50"), 512, stem="torchvision")
    deep = count_flops(_cfg("resnet50"), 512)
    assert tv == pytest.approx(238, rel=0.01)
    assert deep > tv + 2 * (64 * 64 + 128 * 64) * 9 * 256 * 256 / 1e9 - 5


# ------------------------------------------------------------------------------------------
# ONNX export with dynamic batch / height / width

# ONNX ops the export may contain: all supported by ONNX Runtime and TensorRT's ONNX parser.
_SIMPLE_OPS = {"Conv", "Relu", "MaxPool", "Add", "Resize", "Mul", "ReduceSum", "Sqrt", "Clip",
               "Max", "Div", "Constant", "BatchNormalization", "Identity"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_dynamic_shapes_parity(tiny, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net, clf = tiny
    model = SegmentationModel(net, clf).eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["embedding", "logits"],
        dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                      "embedding": {0: "batch", 2: "h4", 3: "w4"},
                      "logits": {0: "batch", 2: "h4", 3: "w4"}})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {n.op_type for n in proto.graph.node} <= _SIMPLE_OPS
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 96, 128), (1, 3, 136, 72)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            phi_t, logits_t = model(x)
        phi_o, logits_o = sess.run(None, {"image": x.numpy()})
        assert phi_o.shape == tuple(phi_t.shape) and logits_o.shape == tuple(logits_t.shape)
        assert np.abs(phi_o - phi_t.numpy()).max() < 1e-4
        cos = (phi_o * phi_t.numpy()).sum(axis=1)
        assert cos.min() >= 0.9999
        assert np.abs(logits_o - logits_t.numpy()).max() < 1e-3


# ------------------------------------------------------------------------------------------
# the light FPN-style decoder (model.decoder: fpn) and older configurations


def test_fpn_decoder_shapes_and_parameters():
    """The fpn decoder outputs stride-4 embeddings of the right shape at any multiple of 8, has
    the decoder's layers under ``head`` (so the head's learning-rate multipliers apply), and an
    unknown decoder name is a ConfigError."""
    torch.manual_seed(0)
    net = EmbeddingNet(_cfg(decoder="fpn", decoder_channels=24)).eval()
    _randomize_bn(net)
    assert isinstance(net.head, FPNHead) and net.head.out.out_channels == 32
    for h, w in [(64, 64), (40, 72), (136, 24)]:
        with torch.no_grad():
            assert net(torch.randn(2, 3, h, w)).shape == (2, 32, h // 4, w // 4)
    names = {n.split(".")[1] for n, _ in net.named_parameters() if n.startswith("head.")}
    assert names == {"aspp", "bn_ctx", "lateral", "bn_lateral", "fuse", "bn_fuse", "out"}
    with pytest.raises(ConfigError, match="model.decoder"):
        EmbeddingNet(_cfg(decoder="unet"))


def test_config_without_decoder_fields_builds_the_spec_network():
    """A config.json written before the decoder existed (no 'decoder' key) rebuilds exactly the
    committed network: the retrieval bundle's weights load strictly into it."""
    import json
    from pathlib import Path

    from spml_deploy.config import RunConfig, from_dict

    asset = Path(__file__).parent / "assets" / "retrieval_tiny"
    stored = json.loads((asset / "config.json").read_text())
    assert "decoder" not in stored["model"]
    cfg = from_dict(RunConfig, stored)
    assert cfg.model.decoder == ""
    net, f0 = build_model(cfg.model)
    assert isinstance(net.head, type(EmbeddingNet(_cfg(decoder="")).head))
    state = torch.load(asset / "weights.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state["net"])          # strict: same keys, same shapes
    with pytest.raises(RuntimeError):          # and the fpn network could not take them
        build_model(replace(cfg.model, decoder="fpn"))[0].load_state_dict(state["net"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_of_both_heads(tmp_path):
    """Both heads export with the simple op set (fpn adds only Conv, BN, Relu, Resize, Add)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    for decoder in ("", "fpn"):
        torch.manual_seed(0)
        net, clf = build_model(_cfg(decoder=decoder))
        _randomize_bn(net)
        model = SegmentationModel(net, clf).eval()
        path = tmp_path / f"m{decoder}.onnx"
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=["phi", "logits"],
                          dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}})
        assert {n.op_type for n in onnx.load(str(path)).graph.node} <= _SIMPLE_OPS
        x = torch.randn(1, 3, 96, 72)
        with torch.no_grad():
            phi_t, _ = model(x)
        phi_o, _ = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"image": x.numpy()})
        assert np.abs(phi_o - phi_t.numpy()).max() < 1e-4
