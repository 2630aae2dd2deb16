"""The validation split: stratified, disjoint from train, covering the data, the same for the same seed."""
import pytest
import torch

from fastdistill.data.dataset import ImageDataset
from fastdistill.data.splits import carve_validation, stratified_split


def _labels():
    # unbalanced classes: 40, 25 and 7 samples, interleaved
    return torch.tensor([0] * 40 + [1] * 25 + [2] * 7)[torch.randperm(72, generator=torch.Generator().manual_seed(3))]


def test_split_is_stratified_disjoint_and_complete():
    labels = _labels()
    train, val = stratified_split(labels, 0.2, seed=0)
    assert set(train.tolist()).isdisjoint(val.tolist()), "a sample on both sides"
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels))), "every sample on one side"
    # round(0.2 * n_c) per class: 8, 5, 1
    assert torch.bincount(labels[val], minlength=3).tolist() == [8, 5, 1]
    assert torch.bincount(labels[train], minlength=3).tolist() == [32, 20, 6]


def test_split_is_seeded():
    labels = _labels()
    a, b, c = (stratified_split(labels, 0.2, seed=s)[1] for s in (0, 0, 1))
    assert torch.equal(a, b), "the same seed gives the same split"
    assert not torch.equal(a, c), "another seed gives another split"


def test_every_class_keeps_a_training_image():
    labels = torch.tensor([0, 0, 1, 1, 1])
    train, val = stratified_split(labels, 0.9, seed=0)
    assert torch.bincount(labels[train], minlength=2).min() >= 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_fraction_is_one_clear_error(fraction):
    with pytest.raises(ValueError, match="validation fraction must be in"):
        stratified_split(_labels(), fraction, seed=0)


def test_carve_validation_records_the_split():
    labels = _labels()
    ds = ImageDataset(labels=labels, classes=["a", "b", "c"], images=torch.zeros(72, 1, 4, 4, dtype=torch.uint8))
    train, val, record = carve_validation(ds, 0.2, seed=5)
    assert len(train) + len(val) == 72 and record["val"] == len(val) == 14
    assert record["val_per_class"] == [8, 5, 1] and record["seed"] == 5 and record["fraction"] == 0.2
    _, again, _ = carve_validation(ds, 0.2, seed=5)
    assert torch.equal(again.labels, val.labels)
