"""The two-pass LGM step (``method.chunk_size``): the same pixel gradient as the one-pass step in float64 (random
sizes, 1-3 backbones of different families, chunks that do not divide the views, pyramid and pixels), the same
training in float32, the ``auto`` chunk size, one-line errors."""
import pytest
import torch

from fastdistill.models import create_backbone
from fastdistill.engine.memory import activation_mib_per_view
from fastdistill.recipes.lgm import LGMRecipe
from fastdistill.api import run
from fastdistill.config import compose

# (backbone id, constructor kwargs): a ResNet, a ViT (16 px views, 4 px patches) and an EfficientNet
FAMILIES = [("timm:test_resnet", {}), ("timm:test_vit", {"img_size": 16, "patch_size": 4}),
            ("timm:test_efficientnet", {})]
VIEW = 16


def _recipe(tmp_path, backbones, *extra, dtype=torch.float32, size=12, classes=4):
    cfg = compose(["+method=lgm", "preset=smoke", f"method.backbones=[{','.join(b for b, _ in backbones)}]",
                   "method.backbone_pretrained=none", f"method.image_size={VIEW}", "eval.backbone=timm:test_byobnet",
                   "eval.pretrained=none", "progress=false", f"out={tmp_path}",
                   f"method.backbone_weights=[{','.join(str(1.0 + 0.5 * m) for m in range(len(backbones)))}]", *extra])
    recipe = LGMRecipe(cfg)
    recipe.prepare([create_backbone(b, **kw).to(dtype) for b, kw in backbones], (size, size), 3, classes)
    recipe.init_synthetic()
    with torch.no_grad():
        recipe.levels = [lv.to(dtype).requires_grad_() for lv in recipe.levels]
        recipe.base = recipe.base.to(dtype)
    recipe._reset_optimizer()
    return recipe


def _gradients(recipe, chunk_size, real, seed):
    recipe.chunk_size = chunk_size
    for lv in recipe.levels:
        lv.grad = None
    torch.manual_seed(seed)  # the same draws (views, noise, heads) for both steps
    loss = recipe.compute_gradients(real)
    return loss.detach(), [lv.grad.clone() for lv in recipe.levels]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_pass_gradient_equals_one_pass_in_float64(tmp_path, seed):
    gen = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    families = [FAMILIES[i] for i in torch.randperm(3, generator=gen)[:seed + 1].tolist()]  # 1, 2, 3 backbones
    ipc, classes, augs, size = pick(1, 2), pick(2, 5), pick(2, 4), pick(7, 14)
    parametrization = ["pyramid", "pixels", "pyramid"][seed]
    recipe = _recipe(tmp_path, families, f"ipc={ipc}", f"method.augs_per_batch={augs}",
                     f"method.parametrization={parametrization}", "method.noise_p=0.5",
                     dtype=torch.float64, size=size, classes=classes)
    if parametrization == "pyramid":
        recipe.extend_pyramid()
        recipe.extend_pyramid()
    n = augs * recipe.n_images
    real = (torch.rand(n, 3, size, size, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen))
    loss, expected = _gradients(recipe, 0, real, seed)
    chunks = [c for c in range(2, n) if n % c]
    chunks = sorted({chunks[0], chunks[-1]})  # chunk sizes that do not divide N
    where = (f"seed {seed}: {[b for b, _ in families]} ipc {ipc} C {classes} augs {augs} {size} px "
             f"{parametrization}, N = {n}")
    for chunk in chunks:
        two_loss, grads = _gradients(recipe, chunk, real, seed)
        torch.testing.assert_close(two_loss, loss, atol=1e-13, rtol=1e-12,
                                   msg=lambda m: f"loss, chunk {chunk}, {where}: {m}")
        for k, (g, e) in enumerate(zip(grads, expected)):
            assert e.abs().max() > 0, f"level {k} has a zero one-pass gradient, {where}"
            torch.testing.assert_close(g, e, atol=1e-13 * e.abs().max().item(), rtol=1e-9,
                                       msg=lambda m: f"gradient of level {k}, chunk {chunk}, {where}: {m}")


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_two_pass_training_follows_the_one_pass_run(tmp_path, kernels):
    """The two-pass step on ``kernels`` (the Triton head-sum and feature-gradient kernels, interpreted on CPU, or
    the torch reference) follows the one-pass step of the reference."""
    families = FAMILIES[:2]
    runs = {}
    for chunk in (0, 5):
        torch.manual_seed(0)
        recipe = _recipe(tmp_path / str(chunk), families, "method.augs_per_batch=3", "method.parametrization=pixels",
                         "method.lr=0.05", "method.iterations=3", f"method.chunk_size={chunk}",
                         f"kernels={kernels if chunk else 'torch'}")
        assert recipe.chunk_size == chunk
        real = (torch.rand(12, 3, 12, 12, generator=torch.Generator().manual_seed(1)),
                torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(2)))
        losses = [recipe.distill_step(real).item() for _ in range(3)]
        runs[chunk] = (losses, recipe.images().detach())
    torch.testing.assert_close(torch.tensor(runs[5][0]), torch.tensor(runs[0][0]), atol=1e-5, rtol=1e-4,
                               msg="losses of 3 two-pass steps vs one-pass")
    torch.testing.assert_close(runs[5][1], runs[0][1], atol=1e-5, rtol=1e-4, msg="synthetic images after 3 steps")
    assert not torch.equal(runs[0][1], _recipe(tmp_path / "init", families).images().detach())


def test_auto_chunk_size_is_the_budget_over_the_saved_activations_per_view(tmp_path):
    recipe = _recipe(tmp_path, FAMILIES[:2])
    per_view = max(activation_mib_per_view(b, (VIEW, VIEW), recipe.precision) for b in recipe.backbones)
    big = activation_mib_per_view(create_backbone("timm:test_resnet"), (2 * VIEW, 2 * VIEW), recipe.precision)
    small = activation_mib_per_view(create_backbone("timm:test_resnet"), (VIEW, VIEW), recipe.precision)
    assert 3.0 < big / small < 5.0, f"a CNN's activations grow with the pixels: {small:.4f} -> {big:.4f} MiB at 4x"
    budget = 7.5 * per_view
    auto = _recipe(tmp_path, FAMILIES[:2], "method.chunk_size=auto", f"method.memory_budget_mib={budget}")
    assert auto.chunk_size == 7, f"auto chunk for a budget of 7.5 views' activations: {auto.chunk_size}"
    assert _recipe(tmp_path, FAMILIES[:1], "method.chunk_size=auto").chunk_size == 0, \
        "the default budget holds every view: one pass, no second forward"


@pytest.mark.parametrize("extra, message", [
    (["method.chunk_size=-1"], "method.chunk_size must be an integer >= 0 (0 = one pass) or auto, got -1"),
    (["method.chunk_size=half"], "method.chunk_size must be an integer >= 0 (0 = one pass) or auto, got 'half'"),
    (["method.memory_budget_mib=0"], "method.memory_budget_mib must be a number of MiB > 0 or null, got 0"),
    (["method.replica_check_every=-1"], "method.replica_check_every must be an integer >= 0 (steps; 0 = only at the "
                                        "end), got -1"),
])
def test_bad_chunk_and_replica_settings_are_one_clear_error(tmp_path, extra, message):
    with pytest.raises(ValueError) as err:
        run(compose(["+method=lgm", "preset=smoke", "method.backbone_pretrained=none", f"out={tmp_path}", *extra]))
    assert str(err.value) == message
