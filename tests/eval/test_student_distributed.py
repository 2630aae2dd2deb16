"""A student trained as 2 gloo DDP replicas under torchrun, killed after a checkpoint and resumed: the same weights
as the unbroken 2-rank run (every rank takes part in each save, so a save that one rank skipped would hang)."""
import torch

SCRIPT = """
import sys
import torch
from fastdistill.data.dataset import ImageDataset
from fastdistill.engine import Precision
from fastdistill.engine import distributed as dist
from fastdistill.eval import student as st

mode, folder = sys.argv[1], sys.argv[2]
cpu = dist.init(torch.device("cpu"))


class Killed(Exception):
    pass


class Out:  # kills every rank when epoch 3 is logged: after the checkpoint that epoch 2 ended with
    def log(self, phase, step, **values):
        if mode == "kill" and step == 3:
            raise Killed

    def rewind(self, phase, step):
        pass


images = torch.randint(0, 255, (16, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
data = ImageDataset(labels=torch.arange(4).repeat_interleave(4), classes=list("abcd"), images=images)
cfg = st.StudentConfig(epochs=5, batch_size=4, lr=1e-2, targets="hard", hflip=False)
if mode == "accumulate":  # the published 2 x 8, scaled down: a batch of 8 as 2 micro-batches of 4
    cfg = st.StudentConfig(epochs=3, batch_size=8, accumulation_steps=2, lr=1e-2, targets="hard", hflip=False)
try:
    r = st.train_student("timm:test_resnet", data, [], None, (16, 16), cfg, cpu, Precision("fp32", cpu), seed=0,
                         num_workers=0, num_classes=4, out=Out(), checkpoint=folder + "/ckpt", checkpoint_every=4,
                         checkpoint_min_s=0, resume=mode == "resume")
except Killed:
    dist.cleanup()  # leave the process group in order: a rank exiting inside it can abort its peer's gloo threads
    sys.exit(0)
if dist.is_main():
    torch.save(r["model"].state_dict(), folder + "/weights.pt")
dist.cleanup()
"""


def test_ddp_student_resumes_to_the_unbroken_weights(tmp_path, run_python):
    (tmp_path / "train.py").write_text(SCRIPT)
    for mode, folder in (("whole", "whole"), ("kill", "cut")):
        (tmp_path / folder).mkdir()
        run_python(tmp_path / "train.py", mode, tmp_path / folder, ranks=2)
    saved = torch.load(tmp_path / "cut" / "ckpt" / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 3 and len(saved["rng_ranks"]) == 2, "epochs 0-2 saved, with both ranks' RNG states"
    run_python(tmp_path / "train.py", "resume", tmp_path / "cut", ranks=2)
    whole = torch.load(tmp_path / "whole" / "weights.pt")
    resumed = torch.load(tmp_path / "cut" / "weights.pt")
    for k, v in whole.items():
        assert torch.equal(v, resumed[k]), f"{k} differs after the resume"


def test_ddp_ranks_take_whole_micro_batches_as_one_process_does(tmp_path, run_python):
    # a batch of 8 as 2 x 4 in one process (the published training) and over 2 ranks: each rank one micro-batch of
    # 4, so BatchNorm sees the same images and the weights agree up to summation order. Not the running statistics:
    # DDP keeps rank 0's, which followed one micro-batch of each step where one process follows both
    (tmp_path / "train.py").write_text(SCRIPT)
    for ranks in (1, 2):
        (tmp_path / str(ranks)).mkdir()
        run_python(tmp_path / "train.py", "accumulate", tmp_path / str(ranks), ranks=ranks)
    one, two = (torch.load(tmp_path / str(r) / "weights.pt") for r in (1, 2))
    weights = [k for k in one if "running_" not in k and "num_batches" not in k]
    assert len(weights) > 10
    for k in weights:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}, 2 ranks vs 1: {m}")
