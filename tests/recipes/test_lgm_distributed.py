"""Data-parallel LGM: ``torchrun --nproc_per_node=2`` (gloo, CPU) gives the synthetic set of one process after a
few steps with the same draws, also when the ranks were killed and resumed; ranks whose replicas diverge stop
with a clear error (slow)."""
import json

import pytest
import torch

from fastdistill.models.pyramid import decode

# tiny random-init backbones of two families; two-pass chunks of 7 views that split neither the 40 views nor a rank's 20
ARGS = ["+method=lgm", "preset=smoke", "ipc=2", "method.backbones=[timm:test_resnet,timm:test_vit]",
        "method.backbone_pretrained=none", "method.backbone_kwargs=[{},{img_size:16,patch_size:4}]",
        "method.image_size=16", "method.iterations=3", "method.pyramid_every=2", "method.augs_per_batch=2",
        "method.noise_p=0.5", "method.chunk_size=7", "method.replica_check_every=1", "eval.backbone=timm:test_byobnet",
        "eval.pretrained=none", "eval.runs=1", "eval.epochs=1", "eval.real_random=false", "eval.full=false",
        "progress=false", "checkpoint_every=0", "device=cpu"]


def _state(out):
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)


def _levels(out):
    return _state(out)["levels"]


def _base(out):
    return _state(out)["base"]


def test_two_ranks_give_the_synthetic_set_of_one_process(tmp_path, run_python):
    run_python("-m", "fastdistill.run", *ARGS, f"out={tmp_path / 'one'}", timeout=300)
    run_python("-m", "fastdistill.run", *ARGS, f"out={tmp_path / 'two'}", ranks=2, timeout=300)
    single, double = _levels(tmp_path / "one"), _levels(tmp_path / "two")
    assert [tuple(lv.shape) for lv in double] == [(20, 1, 1, 1), (20, 1, 2, 2)], "a pyramid level at step 2"
    for k, (a, b) in enumerate(zip(double, single)):
        # the same draws and the same maths; only the order of the all-reduced sums differs (measured 1.5e-8)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"pyramid level {k}, 2 ranks vs 1: {m}")
    torch.testing.assert_close(decode(double, _base(tmp_path / "two")), decode(single, _base(tmp_path / "one")),
                               atol=1e-6, rtol=1e-5, msg="synthetic images, 2 ranks vs 1")
    losses = [[h["loss"] for h in _state(tmp_path / run)["history"]] for run in ("two", "one")]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), msg="loss history, 2 ranks vs 1")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


KILLED_RANK = """
import json, sys
import torch
from fastdistill.engine import distributed as dist
from fastdistill.recipes.lgm import LGMRecipe
from fastdistill.config import compose

args, out = json.loads(sys.argv[1]), sys.argv[2]
dist.init(torch.device("cpu"))
recipe = LGMRecipe(compose(args + [f"out={out}"]))
recipe.setup()
save = recipe.save_checkpoint


def save_then_die():  # every rank is killed right after the first checkpoint (step 3: mid-level, Adam state in use)
    save()
    raise KeyboardInterrupt


recipe.save_checkpoint = save_then_die
try:
    recipe.train()
except KeyboardInterrupt:
    pass
finally:
    dist.cleanup()
"""


def test_killed_ranks_resume_to_the_one_process_set(tmp_path, run_python):
    longer = [*ARGS, "method.iterations=5"]
    run_python("-m", "fastdistill.run", *longer, f"out={tmp_path / 'one'}", timeout=300)
    script, out = tmp_path / "killed_rank.py", tmp_path / "killed"
    script.write_text(KILLED_RANK)
    run_python(script, json.dumps([*longer, "checkpoint_every=3"]), out, ranks=2, timeout=300)
    assert _state(out)["step"] == 3 and not (out / "metrics.json").exists(), "killed after step 3"
    run_python("-m", "fastdistill.run", *longer, "checkpoint_every=3", "resume=true", f"out={out}", ranks=2,
               timeout=300)
    assert _state(out)["step"] == 5 and len(_levels(out)) == len(_levels(tmp_path / "one")) == 3, \
        "resumed to the end, the pyramid grown at steps 2 and 4"
    for k, (a, b) in enumerate(zip(_levels(out), _levels(tmp_path / "one"))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"pyramid level {k}, resumed vs 1: {m}")
    losses = [[h["loss"] for h in _state(run)["history"]] for run in (out, tmp_path / "one")]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), msg="loss history, resumed vs 1")


DIVERGING_RANK = """
import json, sys
import torch
from fastdistill.engine import distributed as dist
from fastdistill.recipes.lgm import LGMRecipe
from fastdistill.config import compose

args, out = json.loads(sys.argv[1]), sys.argv[2]
dist.init(torch.device("cpu"))
rank, error = dist.rank(), None
try:
    recipe = LGMRecipe(compose([*args, f"out={out}/run", "method.iterations=2"]))
    recipe.setup()
    if rank == 1:  # a replica that went wrong
        with torch.no_grad():
            recipe.levels[0][0, 0] += 1e-3
    recipe.train()
except RuntimeError as e:
    error = str(e)
finally:
    dist.cleanup()
open(f"{out}/rank{rank}.json", "w").write(json.dumps(error))
"""


@pytest.mark.slow  # two more processes; check_replicas itself is in tests/engine/test_distributed.py
def test_diverged_replicas_stop_with_a_clear_error(tmp_path, run_python):
    script = tmp_path / "diverging_rank.py"
    script.write_text(DIVERGING_RANK)
    run_python(script, json.dumps(ARGS), tmp_path, ranks=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got is not None and got.startswith(
            "the replicas of the LGM synthetic parameters at step 1 differ across ranks"), f"rank {rank}: {got}"
