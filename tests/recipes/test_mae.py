"""+method=mae: masking (exact count, no leakage of masked pixels), patch order, the loss against a direct
reference, and the recipe end to end (loss falls, checkpoint loads into the backbone factory, exact resume)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fastdistill.losses.mae import mae_loss
from fastdistill.models import create_backbone
from fastdistill.models.ssl import MAEDecoder, MAEModel, mae_encode, patchify, random_masking, unpatchify
from fastdistill.api import run
from fastdistill.config import compose

VIT = {"img_size": 28, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.mark.parametrize("length, ratio", [(49, 0.75), (49, 0.5), (16, 0.9), (10, 0.0)])
def test_random_masking_hides_exactly_the_requested_count(length, ratio):
    g = torch.Generator().manual_seed(length)
    ids_keep, mask, ids_restore = random_masking(6, length, ratio, generator=g)
    keep = int(length * (1 - ratio))
    assert ids_keep.shape == (6, keep) and mask.shape == (6, length)
    assert torch.equal(mask.sum(1), torch.full((6,), float(length - keep))), "masked patches per image"
    for n in range(6):
        assert torch.equal(mask[n].nonzero().flatten().sort().values,
                           torch.tensor(sorted(set(range(length)) - set(ids_keep[n].tolist())))), "mask vs ids_keep"
    # ids_restore undoes the shuffle: [visible, masked] -> patch order
    shuffled = torch.cat([ids_keep, torch.stack([m.nonzero().flatten() for m in mask.bool()])[:, :length - keep]], 1)
    assert torch.equal(ids_keep, ids_restore.argsort(1)[:, :keep])
    assert shuffled.shape == (6, length)


def test_bad_mask_ratio_is_clear():
    with pytest.raises(ValueError, match="at least one of 49 patches visible"):
        random_masking(2, 49, 1.0)


def test_patchify_follows_the_token_order_and_inverts():
    x = torch.rand(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    # token l is the patch at row l // 3, column l % 3, pixels (row, col, channel)
    torch.testing.assert_close(p[:, 4].reshape(2, 4, 4, 3), x[:, :, 4:8, 4:8].permute(0, 2, 3, 1))
    torch.testing.assert_close(unpatchify(p, 4, (8, 12), 3), x)


def test_encoder_sees_no_masked_pixel():
    torch.manual_seed(0)
    vit = create_backbone("timm:vit_tiny_patch16_224", **VIT).model.eval()
    x = torch.randn(2, 3, 28, 28)
    ids_keep, mask, _ = random_masking(2, 49, 0.75, generator=torch.Generator().manual_seed(1))
    out = mae_encode(vit, x, ids_keep)
    assert out.shape == (2, 1 + 12, 32)
    # rewrite every masked patch's pixels: the encoder output must not move at all
    masked_pixels = unpatchify(mask[..., None].expand(-1, -1, 48), 4, (28, 28), 3).bool()
    y = torch.where(masked_pixels, torch.randn_like(x) * 100, x)
    torch.testing.assert_close(mae_encode(vit, y, ids_keep), out, atol=0, rtol=0, msg="masked pixels leaked")
    # while a visible patch's pixels do change it
    z = torch.where(~masked_pixels, x + 1, x)
    assert not torch.allclose(mae_encode(vit, z, ids_keep), out)


def test_decoder_restores_patch_order():
    torch.manual_seed(0)
    backbone = create_backbone("timm:vit_tiny_patch16_224", **VIT)
    model = MAEModel(backbone, MAEDecoder(32, 49, 16, dim=16, depth=1, num_heads=2)).eval()
    x = torch.rand(3, 1, 28, 28)
    ids_keep, _, ids_restore = random_masking(3, 49, 0.75)
    assert model(x, ids_keep, ids_restore).shape == (3, 49, 16)


def _mae_reference(pred, target, mask):
    total, count = 0.0, 0.0
    for n in range(pred.shape[0]):
        for l in range(pred.shape[1]):
            t = target[n, l]
            t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
            total += mask[n, l] * ((pred[n, l] - t) ** 2).mean()
            count += mask[n, l]
    return total / count


def test_mae_loss_matches_reference():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 7, 12, generator=g, dtype=torch.float64)
    target = torch.rand(3, 7, 12, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 7, generator=g) < 0.6).double()
    mask[0, 0] = 1
    torch.testing.assert_close(mae_loss(pred.float(), target.float(), mask.float()).double(),
                               _mae_reference(pred, target, mask), atol=1e-5, rtol=1e-5, msg="norm-pix MSE")
    plain = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(mae_loss(pred, target, mask, norm_pix=False).double(),
                               (plain * mask).sum() / mask.sum(), msg="plain MSE on masked patches")
    with pytest.raises(ValueError, match="mae_loss"):
        mae_loss(pred, target[:, :3], mask)


SMALL = ["+method=mae", "preset=smoke", "data.train_per_class=12", "method.batch_size=40", "method.epochs=3",
         "method.model_kwargs={img_size:28,patch_size:4,embed_dim:32,depth:2,num_heads:2}", "method.decoder.dim=32",
         "method.decoder.depth=1", "method.optimizer.lr=3e-2", "method.warmup_epochs=0",
         "method.attention.distance_images=20", "method.attention.images=2", "progress=false", "checkpoint_every=5"]


def _run(tmp_path, name, *extra):
    cfg = compose([*SMALL, f"out={tmp_path / name}", *extra])
    return run(cfg), tmp_path / name


def test_mae_learns_and_saves_a_loadable_encoder(tmp_path):
    metrics, out = _run(tmp_path, "full")
    losses = [h["train_loss"] for h in metrics["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0], f"reconstruction loss must fall: {losses}"
    assert set(metrics["probe"]) == {"mae", "random_init"} and all(0 <= v <= 1 for v in metrics["probe"].values())
    for name in ("model.safetensors", "teacher.json", "metrics.json", "profile.json", "attention_mae.png",
                 "attention_distance.png", "attention_distance.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    card = json.loads((out / "teacher.json").read_text())
    encoder = create_backbone(card["model"], pretrained=str(out / "model.safetensors"), **card["model_kwargs"])
    assert encoder.embed(torch.rand(2, 1, 28, 28)).shape == (2, 32)


@pytest.mark.slow
def test_mae_resumes_exactly(tmp_path, monkeypatch):
    metrics, out = _run(tmp_path, "full")
    import fastdistill.recipes.mae as mae

    real_save = mae.save_checkpoint
    calls = {"n": 0}

    def save_then_die(out_dir, state):
        real_save(out_dir, state)
        calls["n"] += 1
        if calls["n"] == 2:  # killed after the checkpoint of step 5 (3 steps per epoch: mid-epoch 1 of 3)
            raise KeyboardInterrupt

    monkeypatch.setattr(mae, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "broken")
    monkeypatch.setattr(mae, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "broken" / "checkpoint.pt", weights_only=False)["position"]["step"] == 5
    _run(tmp_path, "broken", "resume=true")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "broken" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed run differs from the unbroken one at {k}"
    assert json.loads((tmp_path / "broken" / "metrics.json").read_text())["history"] == metrics["history"]


def test_bad_mae_config_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="method.mask_ratio must be in"):
        _run(tmp_path, "bad", "method.mask_ratio=1.0")


def test_sincos_position_embedding_matches_its_formula_and_is_fixed():
    import math

    from fastdistill.models.ssl import sincos_2d

    rows, cols, dim = 3, 4, 8
    table = sincos_2d((rows, cols), dim)
    for r in range(rows):
        for c in range(cols):
            # written out per element: [sin(c w_i)..., cos(c w_i)..., sin(r w_i)..., cos(r w_i)...], w_i = 1e4^(-i/2)
            freqs = [10000 ** (-i / (dim // 4)) for i in range(dim // 4)]
            expected = ([math.sin(c * w) for w in freqs] + [math.cos(c * w) for w in freqs]
                        + [math.sin(r * w) for w in freqs] + [math.cos(r * w) for w in freqs])
            torch.testing.assert_close(table[r * cols + c], torch.tensor(expected, dtype=torch.float32),
                                       msg=f"patch ({r}, {c})")
    backbone = create_backbone("timm:vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=1,
                               num_heads=2)
    decoder = MAEDecoder(16, 16, 16, dim=8, depth=1, num_heads=2)
    model = MAEModel(backbone, decoder, pos_embed="sincos")
    for name, pos in (("encoder", model.vit.pos_embed), ("decoder", decoder.pos_embed)):
        assert not pos.requires_grad, f"the {name} position embedding must be fixed"
        torch.testing.assert_close(pos[0, -16:], sincos_2d((4, 4), pos.shape[-1]), msg=f"{name} embedding")
        assert pos[0, :-16].abs().sum() == 0, f"the {name}'s class-token position is zero, as published"
    ids_keep, _, ids_restore = random_masking(2, 16, 0.75)
    assert model(torch.rand(2, 3, 16, 16), ids_keep, ids_restore).shape == (2, 16, 16)
    with pytest.raises(ValueError, match="unknown MAE position embedding 'rope'"):
        MAEModel(backbone, decoder, pos_embed="rope")
