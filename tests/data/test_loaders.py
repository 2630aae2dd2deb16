"""Every loader yields the dataset's exact pixels and labels, in a (seed, epoch)-determined order; missing extras
fail with the extra to install. ffcv and dali tests are skipped when the extra is not installed."""
import sys

import pytest
import torch

from fastdistill.data import ImageDataset, build_loader

N, BATCH = 37, 8  # 37 = 4 full batches of 8 and a last one of 5


def make_dataset(channels: int = 3, n: int = N) -> ImageDataset:
    """Random uint8 images whose pixel (0, 0) holds the sample index, so a batch tells which samples it holds."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, 5, 7), dtype=torch.uint8, generator=g)
    images[:, :, 0, 0] = torch.arange(n, dtype=torch.uint8)[:, None]
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageDataset(labels=labels, classes=[str(c) for c in range(10)], images=images, name=f"synthetic{channels}")


def sample_ids(batches) -> torch.Tensor:
    return torch.cat([images[:, 0, 0, 0] for images, _ in batches]).long()


@pytest.fixture(params=["torch", "ffcv", "dali"])
def loader_name(request):
    module = {"ffcv": "ffcv", "dali": "nvidia.dali"}.get(request.param)
    if module:
        pytest.importorskip(module)
    return request.param


@pytest.mark.parametrize("channels", [1, 3])
def test_one_epoch_is_the_dataset(loader_name, channels):
    ds = make_dataset(channels)
    batches = list(build_loader(loader_name, ds, BATCH, shuffle=False).epoch(0))
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64, (images.dtype, labels.dtype)
    assert labels.shape == (N,), labels.shape
    torch.testing.assert_close(images, ds.images, rtol=0, atol=0, msg=f"{loader_name}: pixels of one epoch")
    torch.testing.assert_close(labels, ds.labels, rtol=0, atol=0, msg=f"{loader_name}: labels of one epoch")


def test_shuffle_keeps_every_sample_once(loader_name):
    ds = make_dataset()
    batches = list(build_loader(loader_name, ds, BATCH, shuffle=True, seed=1).epoch(0))
    ids = sample_ids(batches)
    assert not torch.equal(ids, torch.arange(N)), f"{loader_name}: shuffle=True kept the dataset order"
    torch.testing.assert_close(ids.sort().values, torch.arange(N), msg=f"{loader_name}: samples of a shuffled epoch")
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    torch.testing.assert_close(images, ds.images[ids], rtol=0, atol=0, msg=f"{loader_name}: shuffled pixels")
    torch.testing.assert_close(labels, ds.labels[ids], rtol=0, atol=0, msg=f"{loader_name}: shuffled labels")


@pytest.mark.parametrize("drop_last, batches, last", [(False, 5, 5), (True, 4, BATCH)])
def test_len_and_drop_last(loader_name, drop_last, batches, last):
    loader = build_loader(loader_name, make_dataset(), BATCH, shuffle=True, drop_last=drop_last)
    sizes = [len(labels) for _, labels in loader.epoch(0)]
    assert len(loader) == batches, f"{loader_name}: len() with drop_last={drop_last}"
    assert len(sizes) == batches and sizes[-1] == last, f"{loader_name}: batch sizes {sizes}"


def test_order_is_a_function_of_seed_and_epoch(loader_name):
    ds = make_dataset()
    first, second = (build_loader(loader_name, ds, BATCH, shuffle=True, seed=7) for _ in range(2))
    torch.testing.assert_close(sample_ids(first.epoch(3)), sample_ids(second.epoch(3)),
                               msg=f"{loader_name}: order of (seed 7, epoch 3) across two loaders")
    assert not torch.equal(sample_ids(first.epoch(3)), sample_ids(first.epoch(4))), f"{loader_name}: epochs 3 and 4"
    other_seed = build_loader(loader_name, ds, BATCH, shuffle=True, seed=8)
    assert not torch.equal(sample_ids(first.epoch(3)), sample_ids(other_seed.epoch(3))), f"{loader_name}: seeds 7, 8"


@pytest.mark.parametrize("start", [1, 4])
def test_start_skips_batches(loader_name, start):
    loader = build_loader(loader_name, make_dataset(), BATCH, shuffle=True, seed=2)
    full = list(loader.epoch(5))
    resumed = list(loader.epoch(5, start=start))
    assert len(resumed) == len(full) - start, f"{loader_name}: batches after start={start}"
    for (images, labels), (ref_images, ref_labels) in zip(resumed, full[start:]):
        torch.testing.assert_close(images, ref_images, rtol=0, atol=0, msg=f"{loader_name}: pixels after start={start}")
        torch.testing.assert_close(labels, ref_labels, rtol=0, atol=0, msg=f"{loader_name}: labels after start={start}")


def test_dali_order_is_torch_order():
    pytest.importorskip("nvidia.dali")
    ds = make_dataset()
    torch_ids = sample_ids(build_loader("torch", ds, BATCH, shuffle=True, seed=3).epoch(2))
    dali_ids = sample_ids(build_loader("dali", ds, BATCH, shuffle=True, seed=3).epoch(2))
    torch.testing.assert_close(dali_ids, torch_ids, msg="dali vs torch: sample order of (seed 3, epoch 2)")


@pytest.mark.parametrize("name, module", [("ffcv", "ffcv"), ("dali", "nvidia.dali")])
def test_missing_extra_names_it(monkeypatch, name, module):
    loader_module = f"fastdistill.data.{name}_loader"
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    # re-import the loader module under the block; setitem first so teardown restores (or removes) it
    monkeypatch.setitem(sys.modules, loader_module, None)
    del sys.modules[loader_module]
    with pytest.raises(ModuleNotFoundError, match=rf"pip install 'fastdistill\[{name}\]'"):
        build_loader(name, make_dataset(), BATCH)


def test_dali_decodes_files_as_the_torch_loader_does(tmp_path):
    pytest.importorskip("nvidia.dali")
    from omegaconf import OmegaConf

    from fastdistill.data import build_dataset
    from fastdistill.data.rehearsal import write_jpeg_folder

    write_jpeg_folder(tmp_path, classes=3, per_class=4, sizes=(40, 90))
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path), "image_size": 32, "crop_pct": 0.875,
                            "test_fraction": 0.2, "split_seed": 0, "cache": False})
    train = build_dataset(cfg)["train"]
    ref = list(build_loader("torch", train, 5, shuffle=True, seed=1, num_workers=0).epoch(0))
    got = list(build_loader("dali", train, 5, shuffle=True, seed=1, num_workers=2).epoch(0))
    assert [x.shape for x, _ in got] == [x.shape for x, _ in ref] and all(x.dtype == torch.uint8 for x, _ in got)
    torch.testing.assert_close(torch.cat([y for _, y in got]), torch.cat([y for _, y in ref]))
    # the same resize and crop geometry: a one-pixel offset would cost about 4-10 grey levels on these images
    per_image = (torch.cat([x for x, _ in got]).float() - torch.cat([x for x, _ in ref]).float()).abs().mean((1, 2, 3))
    assert per_image.max() < 2, f"DALI vs PIL decode, mean absolute difference per image: {per_image.tolist()}"


@pytest.mark.parametrize("n, batch", [(37, 8), (40, 8), (5, 12)])
def test_pass_batch_draws_without_replacement_within_a_pass(n, batch):
    from fastdistill.data.loaders import pass_batch

    per_pass = n // batch
    if per_pass:  # a shuffled loader with drop_last: the batches of one pass never share a sample
        steps = [pass_batch(n, batch, 3, s) for s in range(2 * per_pass)]
        for p in range(2):
            ids = torch.cat(steps[p * per_pass:(p + 1) * per_pass])
            assert ids.unique().numel() == per_pass * batch, f"pass {p} repeats a sample"
        assert not torch.equal(torch.cat(steps[:per_pass]), torch.cat(steps[per_pass:])), "each pass is reshuffled"
    else:  # a batch larger than the data: whole passes, so every sample appears floor or ceil(batch / n) times
        counts = torch.bincount(pass_batch(n, batch, 3, 0), minlength=n)
        assert counts.min() >= batch // n and counts.max() <= -(-batch // n)
    torch.testing.assert_close(pass_batch(n, batch, 3, 5), pass_batch(n, batch, 3, 5), msg="a function of seed, step")
    assert pass_batch(n, batch, 3, 0).shape == (batch,)


def test_repeated_augmentation_repeats_each_sample_in_a_row_and_keeps_the_epoch():
    # DeiT's RASampler (3 repeats): copies in a row of the shuffled order, the epoch as long as without repeats
    ds = make_dataset(n=36)
    loader = build_loader("torch", ds, 12, seed=3, repeats=3)
    assert len(loader) == 3
    ids = sample_ids(loader.epoch(2))
    assert ids.numel() == 36 and ids.unique().numel() == 12, "36 draws of 12 distinct samples"
    torch.testing.assert_close(ids.view(12, 3), ids[::3, None].expand(12, 3), msg="three copies in a row")
    plain = sample_ids(build_loader("torch", ds, 12, seed=3).epoch(2))
    torch.testing.assert_close(ids[::3], plain[:12], msg="the copies follow the plain shuffled order")
    assert not torch.equal(ids, sample_ids(loader.epoch(3))), "a new order each epoch"
    torch.testing.assert_close(sample_ids(loader.epoch(2, start=1)), ids[12:], msg="a resume replays the rest")
    # torchrun: the ranks' slices of each global batch make up the one-process batch
    ranks = [list(build_loader("torch", ds, 12, seed=3, repeats=3, rank=r, world_size=2).epoch(2)) for r in (0, 1)]
    joined = torch.cat([torch.cat([sample_ids([a]), sample_ids([b])]) for a, b in zip(*ranks)])
    torch.testing.assert_close(joined, ids, msg="two ranks' slices, batch by batch")
    with pytest.raises(ValueError, match="repeated augmentation must be an integer >= 1"):
        build_loader("torch", ds, 12, repeats=0)
    with pytest.raises(ValueError, match="needs loader=torch"):
        build_loader("ffcv", ds, 12, repeats=3)


def test_repeated_copies_are_cropped_anew(tmp_path):
    import numpy as np
    from PIL import Image

    from fastdistill.data.dataset import TrainCrop

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(paths[-1])
    ds = ImageDataset(labels=torch.arange(4), classes=list("abcd"), paths=paths, image_size=(16, 16))
    train = ds.train_view(TrainCrop(hflip=False))
    crops = torch.cat([x for x, _ in build_loader("torch", train, 6, seed=1, num_workers=0, repeats=3).epoch(0)])
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[1], crops[2]), "each copy a new crop"
    again = torch.cat([x for x, _ in build_loader("torch", train, 6, seed=1, num_workers=2, repeats=3).epoch(0)])
    torch.testing.assert_close(again, crops, rtol=0, atol=0, msg="crops do not depend on the worker count")
