"""DeiT's augmentation through timm (data/deit_augment.py): RandAugment seeded from torch and at decode, random
erasing in the normalised space, Mixup and CutMix as convex combinations with matching soft targets, clear errors."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from fastdistill.data.dataset import ImageDataset, TrainCrop
from fastdistill.data.deit_augment import BatchAugment, RandAugment, _posterize, check_augment, pil_each
from fastdistill.engine.seeding import rng_state, set_rng_state

POLICY = "rand-m9-mstd0.5-inc1"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(seed=0, mode="RGB", size=24):
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_randaugment_is_a_function_of_torchs_stream_and_leaves_python_and_numpy_alone(mode):
    ra = RandAugment(POLICY, 24, "bicubic", MEAN if mode == "RGB" else (0.45,))
    img = _image(mode=mode)
    random.seed(5)
    np.random.seed(5)
    python, numpy = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(1)
    a = [np.asarray(ra(img)) for _ in range(20)]
    assert (random.random(), np.random.rand()) == (python, numpy), "Python's and NumPy's streams are restored"
    torch.manual_seed(1)
    b = [np.asarray(ra(img)) for _ in range(20)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), "the same torch seed gives the same augmentation"
    assert sum(not np.array_equal(x, np.asarray(img)) for x in a) >= 10, "two ops (p 0.5 each) change most images"
    assert all(x.shape == np.asarray(img).shape for x in a)


def test_posterize_to_zero_bits_is_black_as_deit_ran_it():
    img = _image()
    assert not np.asarray(_posterize(img, 0)).any(), "0 bits kept: black (Pillow 13 would raise)"
    assert np.array_equal(np.asarray(_posterize(img, 8)), np.asarray(img))
    np.testing.assert_array_equal(np.asarray(_posterize(img, 2)), np.asarray(img) & 0b11000000)
    ra = RandAugment(POLICY, 24, "bicubic", MEAN)
    ops = [op for t in ra.transform.transforms for op in t.ops if op.name.startswith("Posterize")]
    assert ops and all(op.aug_fn is _posterize for op in ops)


def test_randaugment_runs_at_decode_seeded_per_sample(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        _image(i, size=40).save(paths[-1])
    ds = ImageDataset(labels=torch.zeros(3, dtype=torch.long), classes=["a"], paths=paths, image_size=(24, 24))
    plain = ds.train_view(TrainCrop(hflip=False))
    augmented = ds.train_view(TrainCrop(hflip=False, augment=RandAugment(POLICY, 24, "bilinear", MEAN)))
    torch.testing.assert_close(augmented[(1, 7)][0], augmented[(1, 7)][0], msg="one seed, one augmented crop")
    differ = sum(not torch.equal(augmented[(1, s)][0], plain[(1, s)][0]) for s in range(20))
    assert differ >= 8, "RandAugment follows the crop of the same seed (two ops, p 0.5 each)"


def test_random_erasing_draws_unit_noise_in_the_normalised_space():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    aug = BatchAugment(1.0, 0.0, 0.0, 0.1, 10, MEAN, STD, torch.device("cpu"))
    y = torch.arange(64) % 10
    out, target = aug(x.clone(), y)
    assert torch.equal(target, y), "labels pass through when nothing mixes"
    changed = (out != x).any(1)
    assert changed.flatten(1).any(1).all(), "p 1: every image has an erased box"
    z = ((out - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).permute(0, 2, 3, 1)
    noise = z[changed]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05, "N(0, 1) per pixel, normalised as DeiT's"
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[~changed], x.permute(0, 2, 3, 1)[~changed],
                               msg="outside the box the image is unchanged")


def test_mixup_and_cutmix_are_convex_combinations_with_their_soft_targets():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16, generator=gen), torch.arange(8)
    eye = torch.eye(10)
    np.random.seed(0)
    out, target = BatchAugment(0.0, 0.8, 0.0, 0.0, 10, MEAN, STD, torch.device("cpu"))(x, y)
    lam = float(target[0, 0])
    torch.testing.assert_close(target, lam * eye[y] + (1 - lam) * eye[y.flip(0)], msg="Mixup targets")
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0), msg="Mixup images, one factor per batch")
    np.random.seed(0)
    out, target = BatchAugment(0.0, 0.0, 1.0, 0.1, 10, MEAN, STD, torch.device("cpu"))(x, y)
    from_partner = (out == x.flip(0)).all(1) & (out != x).any(1)
    area = from_partner.float().mean((1, 2))
    lam = 1 - float(area[0])
    smooth = lambda t: t * 0.9 + 0.1 / 10  # noqa: E731  label smoothing 0.1 folded into the targets
    torch.testing.assert_close(target, lam * smooth(eye[y]) + (1 - lam) * smooth(eye[y.flip(0)]),
                               msg="CutMix targets follow the pasted area", atol=1e-6, rtol=0)
    assert 0 < lam < 1 and torch.allclose(area, area[0]), "one box for the batch"
    torch.testing.assert_close(target.sum(1), torch.ones(8), msg="probabilities")


def test_pil_each_round_trips_one_and_three_channels():
    for c in (1, 3):
        x = torch.rand(4, c, 9, 7)
        expected = x.mul(255).round().div(255)
        torch.testing.assert_close(pil_each(x, lambda im: im), expected, msg=f"{c} channels")


@pytest.mark.parametrize("args, match", [
    (("rand-m9", 1.5, 0.0, 0.0), "random_erasing must be in"),
    (("rand-m9", 0.0, -1.0, 0.0), "mixup, cutmix >= 0"),
    (("v0", 0.0, 0.0, 0.0), "must be a timm RandAugment policy"),
    (("rand-m9-q3", 0.0, 0.0, 0.0), "is not a timm RandAugment policy"),
])
def test_bad_augment_keys_are_one_clear_error(args, match):
    with pytest.raises(ValueError, match=match):
        check_augment(*args)


def test_batch_augment_replays_from_the_checkpointed_generators():
    # what an exact resume relies on: Mixup (NumPy), erasing (Python, torch) draw only from generators a checkpoint
    # restores
    x, y = torch.rand(6, 3, 16, 16), torch.arange(6)
    aug = BatchAugment(0.5, 0.8, 1.0, 0.1, 10, MEAN, STD, torch.device("cpu"))
    state = rng_state()
    a = [aug(x, y) for _ in range(4)]
    set_rng_state(state)
    b = [aug(x, y) for _ in range(4)]
    for (xa, ta), (xb, tb) in zip(a, b):
        torch.testing.assert_close(xa, xb)
        torch.testing.assert_close(ta, tb)
