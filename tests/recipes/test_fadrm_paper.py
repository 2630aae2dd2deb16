"""The switches that make +method=fadrm preset=paper the published pipeline (Jiacheng8/FADRM with LINs-lab/RDED):
each on a tiny budget or on its own, against the published definition."""
import pytest

from fastdistill.config import compose
from fastdistill.recipes.fadrm import FADRMRecipe


def _recipe(tmp_path, *extra):
    return FADRMRecipe(compose(["+method=fadrm", "progress=false", f"out={tmp_path / 'run'}", *extra]))


def test_cifar_stem_where_images_are_at_most_64_px(tmp_path):
    recipe = _recipe(tmp_path)  # method.cifar_stem: auto
    assert recipe.stem_kwargs("timm:resnet18", (28, 28)) == {"cifar_stem": True}
    assert recipe.stem_kwargs("timm:resnet50", (64, 64), "trained") == {"cifar_stem": True}
    assert recipe.stem_kwargs("timm:resnet18", (224, 224)) == {}, "the ImageNet stem at 224 px, as published"
    assert recipe.stem_kwargs("timm:regnetx_002", (28, 28)) == {}, "other families keep their stem"
    assert recipe.stem_kwargs("timm:resnet18.tv_in1k", (28, 28), "hub") == {}, "hub weights have the ImageNet stem"
    forced = _recipe(tmp_path, "method.cifar_stem=true")
    assert forced.stem_kwargs("timm:resnet18", (224, 224)) == {"cifar_stem": True}
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
    assert seen == {"timm:resnet18": {"cifar_stem": True}, "timm:regnetx_002": {}}, seen


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
