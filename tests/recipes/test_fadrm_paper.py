"""The switches that make +method=fadrm preset=paper the published pipeline (Jiacheng8/FADRM with LINs-lab/RDED):
each on a tiny budget or on its own, against the published definition."""
import pytest

from fastdistill.config import compose
from fastdistill.recipes.fadrm import FADRMRecipe


def _recipe(tmp_path, *extra):
    return FADRMRecipe(compose(["+method=fadrm", "progress=false", f"out={tmp_path / 'run'}", *extra]))


def test_cifar_stem_where_images_are_at_most_64_px(tmp_path):
    recipe = _recipe(tmp_path, "method.cifar_stem=auto")  # the paper preset's; the digits default: false
    assert _recipe(tmp_path, "preset=paper").cfg.method.cifar_stem == "auto"
    resnet = {"cifar_stem": True, "zero_init_last": False}  # torchvision's init, as the published networks
    assert recipe.stem_kwargs("timm:resnet18", (28, 28)) == resnet
    assert recipe.stem_kwargs("timm:resnet50", (64, 64), "trained") == resnet
    assert recipe.stem_kwargs("timm:resnet18", (224, 224)) == {}, "the ImageNet stem at 224 px, as published"
    assert recipe.stem_kwargs("timm:regnetx_002", (28, 28)) == {"cifar_stem": True}, "RegNets get stride 1 too"
    assert recipe.stem_kwargs("timm:convnext_atto", (28, 28)) == {}, "other families keep their stem"
    assert recipe.stem_kwargs("timm:resnet18.tv_in1k", (28, 28), "hub") == {}, "hub weights have the ImageNet stem"
    forced = _recipe(tmp_path, "method.cifar_stem=true")
    assert forced.stem_kwargs("timm:resnet18", (224, 224)) == resnet
    assert _recipe(tmp_path, "method.cifar_stem=false").stem_kwargs("timm:resnet18", (28, 28)) == {}
    with pytest.raises(ValueError, match="method.cifar_stem must be auto, true or false, got 'yes'"):
        _recipe(tmp_path, "method.cifar_stem=yes")


def test_cifar_stem_reaches_teachers_and_students(tmp_path, monkeypatch):
    import fastdistill.recipes.fadrm as fadrm

    recipe = _recipe(tmp_path, "preset=smoke", "ipc=1", "method.cifar_stem=auto", "method.teacher_weights=none",
                     "method.candidates_per_class=2", "method.crops_per_image=1", "method.eval.real_random=false",
                     "method.eval.students=[timm:resnet18,timm:regnetx_002]")
    recipe.setup()
    assert recipe.teachers[0].model.conv1.stride == (1, 1), "the 28-px teacher has the CIFAR stem"
    seen = {}

    def fake_student(arch, *args, model_kwargs=None, **kwargs):
        seen[arch] = model_kwargs
        return {"test_acc": 0.0}

    monkeypatch.setattr(fadrm, "train_student", fake_student)
    monkeypatch.setattr(fadrm, "read_distilled", lambda *a, **k: recipe.train_set)
    recipe.evaluate()
    assert seen == {"timm:resnet18": {"cifar_stem": True, "zero_init_last": False},
                    "timm:regnetx_002": {"cifar_stem": True}}, seen


# ---------------------------------------------------------------------------------------------- MRO stage sizes
def test_stage_sizes_follow_the_image_size():
    from fastdistill.recipes.fadrm import stage_size

    default = list(compose(["+method=fadrm"]).method.stage_sizes)
    assert [stage_size(s, (28, 28)) for s in default] == [(24, 24), (28, 28), (24, 24), (28, 28)], \
        "the default preset's stages at 28 px"
    assert [stage_size(s, (64, 64))[0] for s in default] == [55, 64, 55, 64], "fractions, not 28-px stages at 64 px"
    assert stage_size(200, (224, 224)) == (200, 200) and stage_size(None, (56, 48)) == (56, 48)
    assert stage_size(0.5, (56, 48)) == (28, 24)
    for bad in (1, 1.5, 0.0, True, "28"):
        with pytest.raises(ValueError, match="method.stage_sizes entry"):
            stage_size(bad, (28, 28))


def test_a_bad_stage_is_one_line_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"method.stage_sizes entry 1 must be null, a fraction .* \(a float: 1.0 is"):
        _recipe(tmp_path, "method.stage_sizes=[1,28]")


def test_a_student_named_twice_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="method.eval.students names timm:resnet18 more than once; more runs of"):
        _recipe(tmp_path, "method.eval.students=[timm:resnet18,timm:regnetx_002,timm:resnet18]")


def test_roll_in_px_or_as_a_fraction_of_the_image(tmp_path):
    from fastdistill.recipes.fadrm import roll_size

    assert roll_size(32, (224, 224)) == 32 and roll_size(0, (28, 28)) == 0, "px as published"
    assert [roll_size(32 / 224, (n, n)) for n in (28, 64, 224)] == [4, 9, 32]
    assert roll_size(0.25, (64, 48)) == 12, "of the shorter side: one roll bound for both axes, as published"
    for bad in (-1, 1.0, 0.0, True, "4"):
        with pytest.raises(ValueError, match="method.roll must be a size in px >= 0"):
            roll_size(bad, (28, 28))
    with pytest.raises(ValueError, match=r"method.roll must be .* got 1.5"):
        _recipe(tmp_path, "method.roll=1.5")
    assert _prepared(tmp_path, "method.roll=0.143", size=28).roll == 4


# ---------------------------------------------------------------------------------------------- MPT
def _prepared(tmp_path, *extra, size=8):
    """A recipe ready to recover one batch of 10 classes from a random-weight ResNet-18 (no teacher training)."""
    import torch

    from fastdistill.models import create_backbone

    recipe = _recipe(tmp_path, "ipc=1", "method.roll=0", "checkpoint_every=0", *extra)  # extra can override it
    torch.manual_seed(0)
    teacher = create_backbone("timm:resnet18", num_classes=10).freeze()
    recipe.prepare_recovery([teacher], (size, size), 3, 10)
    return recipe


class _NoBar:
    def update(self, *args, **kwargs):
        pass


def test_mpt_precision_per_device():
    import torch

    from fastdistill.engine.precision import cpu_has_bf16_units, mpt_precision

    assert mpt_precision(torch.device("cuda")) == "fp16", "published MPT: fp16 autocast with a GradScaler"
    assert mpt_precision(torch.device("cpu")) == ("bf16" if cpu_has_bf16_units() else "fp32")


def test_mpt_runs_the_forward_in_fp16_with_fp32_pixels_and_adam_state(tmp_path, monkeypatch):
    # forced to fp16 on CPU (torch runs it there, slowly): the teacher's logits come out fp16, the GradScaler is on
    # and checkpointed mid-batch, the pixels and Adam's moments stay fp32, the loss falls
    import torch

    import fastdistill.recipes.fadrm as fadrm

    monkeypatch.setattr(fadrm, "mpt_precision", lambda device: "fp16")
    recipe = _prepared(tmp_path, "method.mpt=true", "method.stage_sizes=[8]", "method.stage_iterations=6",
                       "checkpoint_every=3", "method.crop_scale=[1.0,1.0]", "data.hflip=false")
    assert recipe.mpt == "fp16" and recipe.precision.name == "fp32", "students and relabelling keep fp32"
    dtypes, inner = [], []
    recipe.teachers[0].model.fc.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype) and None)
    saved = recipe.save_checkpoint
    monkeypatch.setattr(recipe, "save_checkpoint", lambda: (inner.append(recipe.inner), saved())[1])
    patches = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    images = recipe.recover_batches([0], patches, [torch.Generator().manual_seed(0)], _NoBar(), None)
    assert set(dtypes) == {torch.float16}, f"teacher logits under MPT: {set(dtypes)}"
    assert images.dtype == torch.float32
    state = inner[0]
    assert state["scaler"]["scale"] > 0, "the GradScaler's state is checkpointed with the batch in progress"
    assert state["x"].dtype == torch.float32
    moments = state["optimizer"]["state"][0]
    assert moments["exp_avg"].dtype == torch.float32 and moments["exp_avg_sq"].dtype == torch.float32
    assert recipe.history[0]["loss_last"] < recipe.history[0]["loss_first"], recipe.history[0]


def test_mpt_off_keeps_the_run_precision(tmp_path):
    recipe = _prepared(tmp_path)
    assert recipe.mpt == recipe.precision.name == "fp32"


# ---------------------------------------------------------------------------------------------- RDED selection
def _delt_medium(ce, n):
    """VILA-Lab/DELT's 'medium' selection restated: scores p = softmax probability of the true class, sorted
    ascending; from index ceil(len / 2) take alternately the next above and below (mid, mid+1, mid-1, mid+2, ...)."""
    import math

    p = (-ce).exp().tolist()
    order = sorted(range(len(p)), key=lambda i: p[i])
    mid, sign, out = math.ceil(len(p) / 2), -1, []
    for k in range(n):
        out.append(order[mid + int(sign * (k + 1) / 2)])
        sign = -sign
    return out


def test_patch_difficulty_easy_and_medium():
    import torch

    from fastdistill.recipes.fadrm import rank_candidates

    for n in (300, 301, 7):
        ce = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 5
        need = min(40, n - 3)
        assert rank_candidates(ce, need, "easy").tolist() == ce.argsort()[:need].tolist(), "RDED: lowest CE first"
        assert rank_candidates(ce, need, "medium").tolist() == _delt_medium(ce, need), f"DELT medium, n={n}"
    everything = rank_candidates(torch.tensor([3.0, 1.0, 2.0, 0.5]), 4, "medium")
    assert sorted(everything.tolist()) == [0, 1, 2, 3], "need == candidates keeps every candidate once"


def _rded_mix(patches, n, factor):
    """LINs-lab/RDED's mix_images restated: grid cell k (row-major) of every image t takes patch k * n + t."""
    import torch

    s = patches.shape[-1]
    out = torch.zeros(n, patches.shape[1], factor * s, factor * s)
    for k in range(factor * factor):
        row, col = divmod(k, factor)
        out[:, :, row * s:(row + 1) * s, col * s:(col + 1) * s] = patches[k * n:(k + 1) * n]
    return out


def test_strided_stitching_is_rdeds():
    import torch

    from fastdistill.recipes.fadrm import patch_ranks

    ipc, factor = 3, 2
    patches = torch.arange(ipc * factor * factor, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    expected = _rded_mix(patches, ipc, factor)
    for k in range(ipc):
        ranks = patch_ranks(k, factor, ipc, "strided")
        grid = patches[ranks].view(factor, factor, 1, 4, 4).permute(2, 0, 3, 1, 4).reshape(1, 8, 8)
        torch.testing.assert_close(grid, expected[k], msg=lambda m: f"image {k}: {m}")
    assert patch_ranks(1, 2, 3, "consecutive") == [4, 5, 6, 7]


def test_patch_scoring_pads_the_patch_with_the_mean_colour(tmp_path):
    import torch

    recipe = _prepared(tmp_path, "method.patches_per_side=2", "method.candidate_scoring=patch", size=28)
    real = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    theta = torch.eye(2, 3).expand(3, 2, 3)
    scored = recipe.scored_pixels(real, theta)
    patch = recipe.patch_pixels(real, theta)
    assert scored.shape == (3, 3, 28, 28) and patch.shape == (3, 3, 14, 14)
    torch.testing.assert_close(scored[..., 7:21, 7:21], patch, msg=lambda m: f"the centred patch: {m}")
    border = scored.clone()
    border[..., 7:21, 7:21] = recipe.mean.expand(3, 3, 14, 14)
    torch.testing.assert_close(border, recipe.mean.expand(3, 3, 28, 28), msg=lambda m: f"the padding: {m}")
    whole = _prepared(tmp_path, "method.patches_per_side=2", size=28)  # candidate_scoring: image
    torch.testing.assert_close(whole.scored_pixels(real, theta), real, atol=1e-5, rtol=0,
                               msg=lambda m: f"the identity window scored at full size: {m}")


def test_published_selection_end_to_end(tmp_path):
    # the paper preset's selection keys on the digits at 2 x 2 patches: every image stitched from 4 different
    # sources in RDED's order, 'medium' picking other candidates than 'easy'
    import torch

    keys = ["preset=smoke", "ipc=2", "method.teacher_weights=none", "method.patches_per_side=2",
            "method.candidates_per_class=12", "method.crops_per_image=2", "method.candidate_scale=[0.08,1.0]",
            "method.candidate_ratio=[1.0,1.0]", "method.candidate_scoring=patch", "method.stitching=strided"]
    medium = _recipe(tmp_path / "m", *keys, "method.patch_difficulty=medium")
    medium.setup()
    easy = _recipe(tmp_path / "e", *keys, "method.patch_difficulty=easy")
    easy.setup()
    for c in range(10):
        assert medium.selection[c]["sources"].unique().numel() == 8, "one patch per source image"
        assert set(medium.selection[c]["sources"].tolist()) != set(easy.selection[c]["sources"].tolist())
    images = medium.class_patches(3, [0, 1])
    assert images.shape == (2, 1, 28, 28)
    first = medium.patch_pixels(*_sources(medium, 3, [0, 2, 4, 6]))  # ranks 0, 2, 4, 6 make image 0
    torch.testing.assert_close(images[0, :, :14, 14:], first[1], msg=lambda m: f"top-right cell = rank 2: {m}")


def _sources(recipe, c, ranks):
    from fastdistill.data.transforms import to_input

    sel = recipe.selection[c]
    real = to_input(recipe.train_set.take(sel["sources"][ranks]), recipe.image_size, recipe.channels)
    return real, sel["theta"][ranks]


# ---------------------------------------------------------------------------------------------- students
def test_paper_students_train_as_published_and_the_default_as_before(tmp_path):
    paper = _recipe(tmp_path, "preset=paper").student_config()
    assert (paper.batch_size, paper.accumulation_steps, paper.crop_scale, paper.lr_schedule, paper.cutmix,
            paper.teacher_bn) == (16, 2, (0.08, 1.0), "epoch", 1.0, "half_batch")
    default = _recipe(tmp_path).student_config()
    assert (default.batch_size, default.accumulation_steps, default.lr_schedule, default.cutmix,
            default.teacher_bn) == (32, 1, "step", 0.0, "running")
    with pytest.raises(ValueError, match="accumulation_steps must be an integer >= 1 dividing batch_size 32"):
        _recipe(tmp_path, "method.eval.accumulation_steps=3")
