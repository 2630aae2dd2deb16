import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fastdistill.data import build_dataset, list_datasets
from fastdistill.data.transforms import random_resized_crop, to_input


def test_mnist5k_fixed_split():
    splits = build_dataset(OmegaConf.create({"name": "mnist5k", "train_per_class": 400}))
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (4000, 1000)
    assert train.images.shape == (4000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    again = build_dataset(OmegaConf.create({"name": "mnist5k", "train_per_class": 400}))
    assert torch.equal(again["test"].images, test.images), "the split must not depend on anything but the config"
    # train and test hold different digits (no image appears in both)
    tr = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in tr for x in test.images)
    assert train.images.float().mean() > 20, "real digits, not blank images"


def test_mnist5k_image_size_resizes_once_at_load():
    base = build_dataset(OmegaConf.create({"name": "mnist5k", "train_per_class": 400}))["train"]
    big = build_dataset(OmegaConf.create({"name": "mnist5k", "train_per_class": 400, "image_size": 56}))["train"]
    assert big.images.shape == (4000, 1, 56, 56) and big.images.dtype == torch.uint8
    assert torch.equal(big.labels, base.labels)
    # the same digits, twice the size: the mean intensity is kept and 2 x 2 pooling gives them back up to the
    # blur of the two resamplings (about 6 grey levels; the next digit in the file is about 35 away)
    assert abs(big.images.float().mean() - base.images.float().mean()) < 1
    back = torch.nn.functional.avg_pool2d(big.images[:50].float(), 2)
    assert (back - base.images[:50].float()).abs().mean() < 8
    assert (back - base.images[1:51].float()).abs().mean() > 20
    with pytest.raises(ValueError, match="data.image_size must be >= 8"):
        build_dataset(OmegaConf.create({"name": "mnist5k", "image_size": 4}))


def _write_folder(root, classes=("cat", "dog"), n=5, size=(12, 10)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_train_test(tmp_path):
    _write_folder(tmp_path / "train")
    _write_folder(tmp_path / "test", n=2)
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path), "image_size": 16, "channels": 3,
                            "test_fraction": 0.2, "split_seed": 0, "cache": True})
    splits = build_dataset(cfg)
    assert splits["train"].classes == ["cat", "dog"]
    assert splits["train"].images.shape == (10, 3, 16, 16)
    assert len(splits["test"]) == 4


def test_imagefolder_seeded_split(tmp_path):
    _write_folder(tmp_path, n=10)
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path), "image_size": 8, "channels": 1,
                            "test_fraction": 0.2, "split_seed": 3, "cache": False})
    a, b = build_dataset(cfg), build_dataset(cfg)
    assert (len(a["train"]), len(a["test"])) == (16, 4)
    assert torch.bincount(a["test"].labels).tolist() == [2, 2]
    assert [str(p) for p in a["test"].paths] == [str(p) for p in b["test"].paths]
    assert not set(map(str, a["test"].paths)) & set(map(str, a["train"].paths))
    assert a["train"][0][0].shape == (1, 8, 8)


def test_imagefolder_corrupt_image_is_one_line(tmp_path):
    _write_folder(tmp_path / "train")
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path), "image_size": 8, "channels": 3,
                            "test_fraction": 0.2, "split_seed": 0, "cache": True})
    with pytest.raises(ValueError, match=r"corrupt image file '.*broken.png'"):
        build_dataset(cfg)


def test_imagefolder_missing_root(tmp_path):
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path / "nope"), "image_size": 8})
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        build_dataset(cfg)
    with pytest.raises(ValueError, match="needs data.root"):
        build_dataset(OmegaConf.create({"name": "imagefolder", "root": None, "image_size": 8}))


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*[(f"data_batch_{i}", 4) for i in range(1, 6)], ("test_batch", 3)]:
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    splits = build_dataset(OmegaConf.create({"name": "cifar", "root": str(tmp_path)}))
    assert splits["train"].images.shape == (20, 3, 32, 32)
    assert len(splits["test"]) == 3 and splits["train"].classes[3] == "c3"
    first = np.frombuffer(pickle.loads((folder / "data_batch_1").read_bytes())["data"][0].tobytes(), np.uint8)
    assert torch.equal(splits["train"].images[0].flatten(), torch.from_numpy(first.copy())), "CHW pixel order"


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'nope'; expected one of .*mnist5k"):
        build_dataset(OmegaConf.create({"name": "nope"}))
    assert {"mnist5k", "imagefolder", "cifar"} <= set(list_datasets())


def test_gray_to_rgb_and_resize():
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    y = to_input(x, (32, 32))
    assert y.shape == (2, 3, 32, 32) and 0 <= y.min() and y.max() <= 1
    assert torch.equal(y[:, 0], y[:, 2])


def test_random_resized_crop_stays_inside():
    # a constant image stays constant under any crop that stays inside it (no zero padding)
    x = torch.full((64, 3, 20, 20), 0.7, requires_grad=True)
    y = random_resized_crop(x, (16, 16), scale=(0.08, 1.0), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, torch.full_like(y, 0.7), msg="crop window left the image")
    y.sum().backward()
    assert x.grad.abs().sum() > 0, "the crop must be differentiable"


def _boxes(theta, size):
    """Pixel boxes (top, left, height, width) of affine_grid windows on an image of ``size``: torchvision's
    (i, j, h, w)."""
    height, width = size
    t = theta.double()
    w, h = t[:, 0, 0] * width, t[:, 1, 1] * height
    left, top = (t[:, 0, 2] + 1) * width / 2 - w / 2, (t[:, 1, 2] + 1) * height / 2 - h / 2
    return torch.stack([top, left, h, w], 1)


def test_crop_windows_are_whole_pixels_inside_the_image():
    from fastdistill.data.transforms import crop_windows

    size = (28, 36)
    boxes = _boxes(crop_windows(5000, size, generator=torch.Generator().manual_seed(0)), size)
    torch.testing.assert_close(boxes, boxes.round(), atol=1e-4, rtol=0, msg=lambda m: f"window edges: {m}")
    top, left, h, w = boxes.round().long().unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 36).all(), \
        "a window leaves the image"
    assert (h >= 1).all() and (w >= 1).all()


def test_crop_windows_follow_torchvision():
    # torchvision's get_params redraws a window that does not fit (10 tries); the clamped draw fastdistill made before
    # (13 % of windows clamped) gave 8 % full-width windows at 28 px against torchvision's 4 %. Area, ratio, position
    # and the share of full-width windows must agree
    torchvision = pytest.importorskip("torchvision")
    from fastdistill.data.transforms import crop_windows

    n, size = 6000, (28, 28)
    torch.manual_seed(1)
    ref = torch.tensor([torchvision.transforms.RandomResizedCrop.get_params(torch.zeros(1, *size), [0.08, 1.0],
                                                                           [3 / 4, 4 / 3]) for _ in range(n)],
                       dtype=torch.float64)
    ours = _boxes(crop_windows(n, size, generator=torch.Generator().manual_seed(2)), size).round()

    def stats(b):
        top, left, h, w = b.unbind(1)
        return {"area": (h * w).mean() / 784, "full width": (w == 28).double().mean(),
                "full height": (h == 28).double().mean(), "aspect": (w / h).log().mean(),
                "centre row": (top + h / 2).mean() / 28}

    got, want = stats(ours), stats(ref)
    for key in want:
        assert abs(got[key] - want[key]) < 0.015, f"{key}: {got[key]:.4f} here, torchvision {want[key]:.4f}"
    # the whole distribution of window areas (two-sample Kolmogorov-Smirnov distance; 0.025 at p 0.05)
    a, b = (ours[:, 2] * ours[:, 3]).sort().values, (ref[:, 2] * ref[:, 3]).sort().values
    grid = torch.cat([a, b]).unique()
    ks = (torch.searchsorted(a, grid, right=True) - torch.searchsorted(b, grid, right=True)).abs().max() / n
    assert ks < 0.025, f"window areas differ from torchvision's (KS distance {ks:.3f})"


def test_crop_windows_fall_back_to_torchvision_centre_crop():
    # no try can fit (area 1 at ratios 0.5-0.8 on a 3:2 image): torchvision's centre crop, clipped to ratio 0.8
    torchvision = pytest.importorskip("torchvision")
    from fastdistill.data.transforms import crop_windows

    size, scale, ratio = (20, 30), (1.0, 1.0), (0.5, 0.8)
    want = torchvision.transforms.RandomResizedCrop.get_params(torch.zeros(1, *size), list(scale), list(ratio))
    boxes = _boxes(crop_windows(4, size, scale, ratio, torch.Generator().manual_seed(0)), size).round().long()
    assert all(tuple(b) == tuple(want) for b in boxes.tolist()), f"{boxes.tolist()} vs torchvision {want}"


def test_random_resized_crop_takes_the_window_pixels():
    # a window of exactly the output size samples pixel centres: the crop is the image's pixels in that box
    from fastdistill.data.transforms import crop_windows

    x = torch.rand(8, 2, 20, 20, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    theta = crop_windows(8, (20, 20), scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=g)
    g = torch.Generator().manual_seed(3)
    y = random_resized_crop(x, (10, 10), scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=g)
    for k, (top, left, h, w) in enumerate(_boxes(theta, (20, 20)).round().long().tolist()):
        assert (h, w) == (10, 10)
        torch.testing.assert_close(y[k], x[k, :, top:top + h, left:left + w], atol=1e-6, rtol=0,
                                   msg=lambda m: f"window {k} at ({top}, {left}): {m}")


def test_bicubic_crop_matches_the_cubic_kernel_and_stays_in_range():
    # a whole-image window at 2x: every output pixel is the a = -0.75 cubic interpolation of the input row
    x = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 6).expand(1, 1, 4, 6)
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    from fastdistill.data.transforms import apply_windows

    def cubic(t, a=-0.75):
        t = abs(t)
        return (a + 2) * t**3 - (a + 3) * t**2 + 1 if t <= 1 else a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0

    row = x[0, 0, 0].tolist()
    want = []
    for j in range(12):
        src = (j + 0.5) / 2 - 0.5  # align_corners=False
        k0 = int(np.floor(src))
        v = 0.0
        for k in range(k0 - 1, k0 + 3):
            kk = min(max(k, -k - 1), 2 * len(row) - 1 - k) if not 0 <= k < len(row) else k  # reflection padding
            v += cubic(src - k) * row[kk]
        want.append(min(max(v, 0.0), 1.0))
    got = apply_windows(x, theta, (4, 12), mode="bicubic")[0, 0, 0]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
    assert got.min() >= 0 and got.max() <= 1, "the cubic overshoot is clamped, as PIL clamps"
    with pytest.raises(ValueError, match="unknown interpolation 'lanczos'"):
        apply_windows(x, theta, (4, 12), mode="lanczos")


def _stripes(path, size=(40, 80)):
    """An RGB image (H, W) = ``size``: left quarter red, right quarter blue, middle green."""
    h, w = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 4, 0] = 255
    arr[:, w // 4: 3 * w // 4, 1] = 255
    arr[:, 3 * w // 4:, 2] = 255
    Image.fromarray(arr).save(path)


def test_eval_decode_resizes_the_shorter_side_and_centre_crops(tmp_path):
    # a 2:1 image: squashing would keep the red and blue borders; the timm/torchvision decode crops them away
    from fastdistill.data.dataset import read_image

    _stripes(tmp_path / "wide.png")
    x = read_image(tmp_path / "wide.png", (16, 16), 3, crop_pct=1.0).float()
    assert x.shape == (3, 16, 16)
    # (squashed, a quarter of the width would be red: mean 64; the antialiased crop edge bleeds a little)
    assert x[1].mean() > 240 and x[0].mean() < 8 and x[2].mean() < 8, "centre crop of a wide image is its green middle"
    # crop_pct 0.5: shorter side 32 px, the 16 px centre is a quarter of the width, still green
    y = read_image(tmp_path / "wide.png", (16, 16), 3, crop_pct=0.5).float()
    assert y[1].mean() > 250 and y[0].max() < 5 and y[2].max() < 5


def test_eval_decode_interpolation_is_torchvisions(tmp_path):
    # DeiT's test transform: Resize(size / 0.875, bicubic) + CenterCrop(size), on the PIL image
    from torchvision import transforms

    from fastdistill.data.dataset import ImageDataset, read_image

    Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        ref = transforms.Compose([transforms.Resize(19, interpolation=transforms.InterpolationMode.BICUBIC),
                                  transforms.CenterCrop(16), transforms.PILToTensor()])(im.convert("RGB"))
    x = read_image(tmp_path / "a.png", (16, 16), 3, crop_pct=0.875, interpolation="bicubic")
    torch.testing.assert_close(x, ref, rtol=0, atol=0, msg="bicubic test decode")
    assert not torch.equal(read_image(tmp_path / "a.png", (16, 16), 3, crop_pct=0.875), ref), "bilinear differs"
    with pytest.raises(ValueError, match="unknown test image interpolation 'nearest'"):
        ImageDataset(labels=torch.zeros(1, dtype=torch.long), classes=["a"], paths=[tmp_path / "a.png"],
                     image_size=(16, 16), interpolation="nearest")


def test_train_decode_sees_the_whole_image_and_is_seeded_per_sample(tmp_path):
    from fastdistill.data.dataset import ImageDataset, TrainCrop

    for i in range(4):
        _stripes(tmp_path / f"{i}.png")
    ds = ImageDataset(labels=torch.zeros(4, dtype=torch.long), classes=["a"], paths=sorted(tmp_path.glob("*.png")),
                      image_size=(16, 16)).train_view(TrainCrop(scale=(0.05, 0.1), ratio=(1, 1), hflip=False))
    crops = torch.stack([ds[(0, s)][0] for s in range(40)]).float()
    red = (crops[:, 0] > 128).float().mean((1, 2)) > 0.9
    blue = (crops[:, 2] > 128).float().mean((1, 2)) > 0.9
    assert red.any() and blue.any(), "small crops land on the borders a centre crop would cut off"
    torch.testing.assert_close(ds[(2, 7)][0], ds[(2, 7)][0], msg="one seed, one crop")


def test_multi_crop_decode_gives_each_view_its_size_and_augment(tmp_path):
    from PIL import Image

    from fastdistill.data.dataset import ImageDataset, TrainCrop

    _stripes(tmp_path / "0.png")
    flat = TrainCrop(size=(8, 8), augment=lambda im: Image.new(im.mode, im.size, (7, 7, 7)))
    ds = ImageDataset(labels=torch.zeros(1, dtype=torch.long), classes=["a"], paths=[tmp_path / "0.png"],
                      image_size=(16, 16)).train_view((TrainCrop(), TrainCrop(), flat))
    views, _ = ds[(0, 3)]
    assert [tuple(v.shape) for v in views] == [(3, 16, 16), (3, 16, 16), (3, 8, 8)]
    assert not torch.equal(views[0], views[1]), "each view draws its own crop"
    assert (views[2] == 7).all(), "a view's augment runs after its crop"


def test_random_window_is_the_eval_resize_cropped_at_a_seeded_position(tmp_path):
    # Resize(short) + RandomCrop(size) (the published LGM loader): every crop is a window of the resized image,
    # positions vary with the seed, and the threaded take() gives what one-at-a-time decoding gives
    from fastdistill.data.dataset import ImageDataset, TrainCrop, read_image
    from torchvision.transforms.v2 import functional as TF

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 64, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    paths = [tmp_path / "wide.png"] * 12
    base = ImageDataset(labels=torch.zeros(12, dtype=torch.long), classes=["a"], paths=paths, image_size=(16, 16))
    ds = base.train_view(TrainCrop(window="random", hflip=False))
    with Image.open(tmp_path / "wide.png") as im:
        full = torch.from_numpy(np.array(TF.resize(im.convert("RGB"), 16, antialias=True))).permute(2, 0, 1)
    assert full.shape == (3, 16, 42)
    seeds = torch.arange(12) * 7 + 3
    crops = ds.take(torch.arange(12), seeds)
    lefts = set()
    for x in crops:
        match = [j for j in range(full.shape[2] - 15) if torch.equal(full[:, :, j:j + 16], x)]
        assert match, "a random-window crop is a 16 px window of the shorter-side-16 image"
        lefts.add(match[0])
    assert len(lefts) > 3, f"crop positions vary with the seed, got {sorted(lefts)}"
    torch.testing.assert_close(crops, torch.stack([ds[(i, int(s))][0] for i, s in enumerate(seeds)]), rtol=0,
                               atol=0, msg="threaded take() equals one-at-a-time decoding")
    torch.testing.assert_close(base.take(torch.arange(2)), read_image(paths[0], (16, 16), 3)[None].expand(2, -1, -1, -1),
                               msg="without a train view: the centre square")
    with pytest.raises(ValueError, match="unknown train crop window 'centre'"):
        TrainCrop(window="centre")


def test_loader_crops_do_not_depend_on_the_worker_count(tmp_path):
    from fastdistill.data.dataset import TrainCrop
    from fastdistill.data.loaders import TorchLoader

    _write_folder(tmp_path, n=6, size=(30, 50))
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path), "image_size": 16, "test_fraction": 0.2,
                            "split_seed": 0, "cache": False})
    train = build_dataset(cfg)["train"].train_view(TrainCrop())
    runs = [torch.cat([x for x, _ in TorchLoader(train, 3, seed=5, num_workers=w).epoch(1)]) for w in (0, 2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0, msg="train crops with 0 and 2 workers")


def test_cache_auto_streams_what_does_not_fit(tmp_path, monkeypatch):
    import fastdistill.data.imagefolder as imagefolder

    _write_folder(tmp_path, n=5)
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path), "image_size": 16, "test_fraction": 0.2,
                            "split_seed": 0, "cache": "auto"})
    assert build_dataset(cfg)["train"].in_memory, "a few KiB fit any machine"
    monkeypatch.setattr(imagefolder, "available_mib", lambda: 0.001)
    streamed = build_dataset(cfg)["train"]
    assert not streamed.in_memory and streamed.take(torch.tensor([3, 1])).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="data.cache must be true, false or auto, got 'yes'"):
        build_dataset(OmegaConf.merge(cfg, {"cache": "yes"}))
