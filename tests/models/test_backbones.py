"""The backbone interface over every source, on small random-weight models."""
import pytest
import torch
import torch.nn as nn

from fastdistill.models import create_backbone, list_sources

CASES = [  # (id, kwargs, input size)
    ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}, 32),
    ("timm:resnet18", {}, 32),
    ("open_clip:ViT-S-32", {}, 224),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def backbone(request):
    torch.manual_seed(0)
    name, kwargs, size = request.param
    return create_backbone(name, pretrained="none", **kwargs), size


def test_sources_registered():
    assert {"timm", "open_clip"} <= set(list_sources())


def test_embed_shape_and_backward(backbone):
    model, size = backbone
    x = torch.rand(2, 3, size, size, requires_grad=True)
    feats = model.embed(x)
    assert feats.shape == (2, model.spec.feature_dim)
    assert torch.isfinite(feats).all()
    feats.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "pixels must receive a gradient"
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:3]}"


def test_grayscale_input_and_own_normalisation(backbone):
    model, size = backbone
    gray = torch.rand(2, 1, size, size)
    torch.testing.assert_close(model.embed(gray), model.embed(gray.expand(-1, 3, -1, -1)))
    x = torch.rand(1, 3, size, size)
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), (x - mean) / std)


def test_attention_probabilities_match_reference(backbone):
    model, size = backbone
    if model.spec.family != "vit":
        with pytest.raises(ValueError, match="has no attention layers"):
            model.attention(torch.rand(1, 3, size, size))
        return
    x = torch.rand(2, 3, size, size)
    got = model.attention(x, layers=[0, -1])
    last = model.num_layers - 1
    assert set(got) == {0, last}
    ref = _reference_attention(model, x, [0, last])
    for i in (0, last):
        assert got[i].shape[-1] == got[i].shape[-2]
        torch.testing.assert_close(got[i].sum(-1), torch.ones_like(got[i][..., 0]), msg=f"layer {i} rows sum to 1")
        torch.testing.assert_close(got[i], ref[i], atol=1e-5, rtol=1e-4, msg=f"layer {i} attention")


def _reference_attention(model, x, layers):
    """Independent reference: timm's unfused path hands the probabilities to attn_drop; nn.MultiheadAttention
    returns them with need_weights=True."""
    out, handles = {}, []
    if model.spec.source == "timm":
        for i in layers:
            attn = model.model.blocks[i].attn
            attn.fused_attn = False
            handles.append(attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o)))
    else:
        blocks = model.model.transformer.resblocks
        for i in layers:
            mha = blocks[i].attn

            def hook(m, args, kwargs, i=i, mha=mha):
                q = args[0] if args else kwargs["query"]
                _, w = nn.MultiheadAttention.forward(mha, q, q, q, need_weights=True, average_attn_weights=False)
                out[i] = w
            handles.append(mha.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model.embed(x)
    for h in handles:
        h.remove()
    if model.spec.source == "timm":
        for i in layers:
            model.model.blocks[i].attn.fused_attn = True
    return out


def test_bn_layers():
    model = create_backbone("timm:resnet18")
    bns = model.bn_layers()
    assert len(bns) == 20 and bns[0][0] == "bn1"
    assert create_backbone("timm:vit_tiny_patch16_224", img_size=32, patch_size=8).bn_layers() == []


def test_classifier_and_freeze():
    model = create_backbone("timm:resnet18", num_classes=7).freeze()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_weights_file_roundtrip(tmp_path):
    from safetensors.torch import save_model

    torch.manual_seed(1)
    src = create_backbone("timm:resnet18", num_classes=5)
    save_model(src.model, str(tmp_path / "w.safetensors"))
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in src.model.state_dict().items()}}, tmp_path / "w.pth")
    x = torch.rand(2, 3, 32, 32)
    for f in ("w.safetensors", "w.pth"):
        dst = create_backbone("timm:resnet18", pretrained=str(tmp_path / f), num_classes=5).eval()
        torch.testing.assert_close(dst(x), src.eval()(x), msg=f"weights from {f}")


def test_weights_that_do_not_fit(tmp_path):
    from safetensors.torch import save_model

    save_model(create_backbone("timm:resnet18").model, str(tmp_path / "r18.safetensors"))
    with pytest.raises(ValueError, match="does not fit the model"):
        create_backbone("timm:resnet34", pretrained=str(tmp_path / "r18.safetensors"))


@pytest.mark.parametrize("name, kwargs, match, exc", [
    ("timm:not_a_model", {}, "unknown timm model 'not_a_model'", ValueError),
    ("keras:resnet", {}, "unknown backbone source 'keras'.*expected one of open_clip, timm", ValueError),
    ("resnet18", {}, "must be SOURCE:NAME", ValueError),
    ("open_clip:Not-A-Model/x", {}, "unknown open_clip model", ValueError),
    ("timm:resnet18", {"pretrained": "/ckpt/missing.pth"}, "pretrained weights '/ckpt/missing.pth' not found",
     FileNotFoundError),
])
def test_clear_errors(name, kwargs, match, exc):
    with pytest.raises(exc, match=match):
        create_backbone(name, **kwargs)


def test_resolution_the_backbone_cannot_take():
    vit = create_backbone("timm:vit_tiny_patch16_224", img_size=32, patch_size=8)
    with pytest.raises(ValueError, match="takes 32x32 px input, got 28x28"):
        vit.embed(torch.rand(1, 3, 28, 28))


def test_cifar_stem_is_the_published_small_image_resnet():
    # the published small-image ResNet-18 (torchvision's with a 3x3 stride-1 conv1 and no max-pool, as LINs-lab/RDED
    # resnet18_modified builds it) with the same weights gives the same logits in float64
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = create_backbone("timm:resnet18", num_classes=10, cifar_stem=True).eval().double()
    ref = torchvision.models.resnet18(num_classes=10)
    ref.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    ref.maxpool = nn.Identity()
    ref.load_state_dict(net.model.state_dict())
    ref = ref.eval().double()
    x = torch.rand(3, 3, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(net(x), ref(net.normalize(x)), rtol=1e-10, atol=1e-10, msg=lambda m: f"logits: {m}")
    # the first block sees the whole 28-px grid (the ImageNet stem leaves 7x7)
    seen = {}

    def record(module, args, out):
        seen["hw"] = tuple(out.shape[-2:])

    net.model.layer1.register_forward_hook(record)
    net(x)
    assert seen["hw"] == (28, 28), f"layer1 output {seen['hw']}"
    assert create_backbone("timm:resnet18").model.conv1.stride == (2, 2), "the stem changes only when asked"


def test_cifar_stem_weights_roundtrip_and_errors(tmp_path):
    from safetensors.torch import save_model

    from fastdistill.models.timm_source import cifar_stem_kwargs

    src = create_backbone("timm:resnet50", num_classes=4, cifar_stem=True).eval()
    save_model(src.model, str(tmp_path / "c.safetensors"))
    dst = create_backbone("timm:resnet50", pretrained=str(tmp_path / "c.safetensors"), num_classes=4,
                          cifar_stem=True).eval()
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(dst(x), src(x), msg="CIFAR-stem weights from a file")
    with pytest.raises(ValueError, match="does not fit the model"):  # the 3x3 stem's file into a 7x7 stem
        create_backbone("timm:resnet50", pretrained=str(tmp_path / "c.safetensors"), num_classes=4)
    with pytest.raises(ValueError, match="hub weights carry the ImageNet stem"):
        create_backbone("timm:resnet18.tv_in1k", pretrained="hub", cifar_stem=True)
    with pytest.raises(ValueError, match="timm:convnext_atto is not a timm ResNet or RegNet"):
        create_backbone("timm:convnext_atto", cifar_stem=True)
    resnet = {"cifar_stem": True, "zero_init_last": False}
    assert cifar_stem_kwargs("timm:resnet101") == cifar_stem_kwargs("timm:resnet18.tv_in1k") == resnet
    assert cifar_stem_kwargs("timm:regnetx_002") == {"cifar_stem": True}
    assert cifar_stem_kwargs("timm:convnext_atto") == cifar_stem_kwargs("open_clip:RN50/openai") == {}


def test_cifar_stem_resnet_starts_as_torchvision_does():
    # the published small-image ResNet-18 is torchvision's: no residual branch starts at zero (timm's default
    # zero-initialises the last BN of each block, which leaves a CIFAR-stem network 4x slower to train on digits)
    from fastdistill.models.timm_source import cifar_stem_kwargs

    net = create_backbone("timm:resnet18", num_classes=10, **cifar_stem_kwargs("timm:resnet18")).model
    gains = [m.weight for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(gains) == 20 and all(bool((g == 1).all()) for g in gains), "a BN gain starts away from 1"
    timm_default = create_backbone("timm:resnet18", num_classes=10, cifar_stem=True).model
    assert not bool((timm_default.layer1[0].bn2.weight == 1).all()), "timm's zero init is what the kwargs undo"


def test_regnet_small_image_stem_keeps_the_grid_and_the_weights():
    # stride 1 in the stem convolution only: the same parameters, so the same state dict fits both, and a 28-px
    # digit reaches the last stage as a 2x2 map instead of 1x1
    torch.manual_seed(0)
    small = create_backbone("timm:regnetx_002", num_classes=10, cifar_stem=True).eval()
    plain = create_backbone("timm:regnetx_002", num_classes=10).eval()
    plain.model.load_state_dict(small.model.state_dict())
    maps = {}
    for tag, net in (("small", small), ("plain", plain)):
        net.model.s4.register_forward_hook(lambda m, a, out, tag=tag: maps.__setitem__(tag, tuple(out.shape[-2:])))
        net(torch.rand(2, 3, 28, 28))
    assert maps == {"small": (2, 2), "plain": (1, 1)}, maps
    assert [i["reduction"] for i in small.model.feature_info] == [1, 2, 4, 8, 16]
