"""Stored soft labels reach the student: the rows are the teachers' labels of exactly the crops the training
draws, an fp16 store trains as online relabelling does, and a coarser store changes the training."""
import pytest
import torch

from fastdistill.data.dataset import ImageDataset
from fastdistill.data.loaders import TorchLoader
from fastdistill.data.soft_labels import SoftLabelShards
from fastdistill.engine import Precision
from fastdistill.eval import student as st
from fastdistill.models import create_backbone

CPU = torch.device("cpu")
PREC = Precision("fp32", CPU)
SIZE = (16, 16)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (12, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    data = ImageDataset(labels=torch.arange(4).repeat_interleave(3), classes=list("abcd"), images=images)
    teacher = create_backbone("timm:test_resnet", num_classes=4).freeze().eval()
    cfg = st.StudentConfig(epochs=3, batch_size=5, lr=1e-2, temperature=4.0)
    return data, teacher, cfg


def test_stored_rows_are_the_teacher_labels_of_the_training_crops(setup, tmp_path):
    data, teacher, cfg = setup
    stats = st.store_soft_labels(tmp_path / "fp16", data, [teacher], SIZE, cfg, CPU, PREC, seed=3, fmt="fp16",
                                 num_workers=0)
    assert stats["rows"] == 3 * 12 and stats["bytes_per_image"] == 3 * 2 * 4, "one fp16 row per image per epoch"
    # replay the training stream of seed 3: its crops, relabelled now, equal the stored rows
    g = torch.Generator().manual_seed(3)
    loader = TorchLoader(data, cfg.batch_size, shuffle=False, num_workers=0)
    crops = torch.cat([x for epoch in range(cfg.epochs) for x, _ in st._batches(loader, SIZE, cfg, g, CPU, epoch)])
    expected = torch.softmax(st.teacher_logits([teacher], crops, PREC) / cfg.temperature, 1)
    stored = torch.stack([SoftLabelShards(tmp_path / "fp16")[i] for i in range(len(crops))])
    torch.testing.assert_close(stored, expected, atol=2e-3, rtol=0, msg="stored rows vs the crops' teacher labels")


def test_training_reads_the_store(setup, tmp_path):
    data, teacher, cfg = setup
    online = st.train_student("timm:test_resnet", data, [teacher], None, SIZE, cfg, CPU, PREC, seed=3,
                              num_workers=0, num_classes=4)
    losses = {}
    for fmt in ("fp16", "topk:1"):
        st.store_soft_labels(tmp_path / fmt, data, [teacher], SIZE, cfg, CPU, PREC, seed=3, fmt=fmt, num_workers=0)
        r = st.train_student("timm:test_resnet", data, [], None, SIZE, cfg, CPU, PREC, seed=3, num_workers=0,
                             num_classes=4, stored_labels=tmp_path / fmt)  # no teacher: the labels come from disk
        losses[fmt] = r["first_loss"]
    # fp16 rows differ from the online fp32 labels by ~1e-4, which Adam's sign-like first steps turn into a few
    # percent of this tiny KL (0.003) by the end of the first epoch; the rows themselves are checked above at 2e-3
    assert losses["fp16"] == pytest.approx(online["first_loss"], rel=5e-2), "fp16 store trains as online does"
    assert abs(losses["topk:1"] - online["first_loss"]) > 1e-3 * online["first_loss"], "top-1 changes the labels"


def test_a_store_of_another_stream_is_refused(setup, tmp_path):
    data, teacher, cfg = setup
    st.store_soft_labels(tmp_path / "s", data, [teacher], SIZE, cfg, CPU, PREC, seed=3, fmt="quant:8", num_workers=0)
    longer = st.StudentConfig(**{**cfg.__dict__, "epochs": 4})
    with pytest.raises(ValueError, match="hold 36 rows, the training draws 48 crops"):
        st.train_student("timm:test_resnet", data, [], None, SIZE, longer, CPU, PREC, seed=3, num_workers=0,
                         num_classes=4, stored_labels=tmp_path / "s")
