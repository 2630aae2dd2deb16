"""The distributed module: sharding arithmetic, loader slices, and collectives in 2 spawned gloo processes."""
import json

import pytest
import torch

from fastdistill.data.dataset import ImageDataset
from fastdistill.data.loaders import build_loader
from fastdistill.engine import distributed as dist


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (7, 2), (2, 4), (0, 2)])
def test_shard_covers_every_item_once_in_order(n, world):
    parts = [dist.shard(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _dataset(n=23):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageDataset(images=images, labels=torch.arange(n) % 3, classes=["a", "b", "c"])


@pytest.mark.parametrize("world", [2, 3])
def test_rank_slices_of_a_loader_make_the_global_batches(world):
    ds = _dataset()
    single = build_loader("torch", ds, batch_size=5, seed=3)
    ranks = [build_loader("torch", ds, batch_size=5, seed=3, rank=r, world_size=world) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)  # 23 = 4 x 5 + 3: the last batch has a sample per rank
    for epoch in (0, 1):
        for (x, y), *slices in zip(single.epoch(epoch, start=1), *[r.epoch(epoch, start=1) for r in ranks]):
            assert torch.equal(torch.cat([s[0] for s in slices]), x)
            assert torch.equal(torch.cat([s[1] for s in slices]), y)


def test_last_batch_smaller_than_the_world_is_dropped_and_tiny_batches_refused():
    ds = _dataset(21)  # 4 x 5 + 1
    assert len(build_loader("torch", ds, batch_size=5)) == 5
    assert len(build_loader("torch", ds, batch_size=5, rank=1, world_size=2)) == 4
    with pytest.raises(ValueError, match="smaller than the 4 processes"):
        build_loader("torch", ds, batch_size=3, rank=0, world_size=4)


def test_single_process_collectives_are_identities():
    t = torch.tensor([1.0, 2.0])
    assert dist.world_size() == 1 and dist.is_main()
    assert torch.equal(dist.all_reduce(t.clone(), "mean"), t)
    dist.check_replicas(t, "t")
    with pytest.raises(ValueError, match="unknown reduce op"):
        dist.all_reduce(t, "prod")


WORKER = """
import json, sys
import torch
from fastdistill.engine import distributed as dist

dist.init(torch.device("cpu"))
rank = dist.rank()
out = {"rank": rank, "world": dist.world_size()}
out["sum"] = dist.all_reduce(torch.tensor([float(rank + 1)])).item()
out["mean"] = dist.all_reduce(torch.tensor([float(rank + 1)]), "mean").item()
out["max"] = dist.all_reduce(torch.tensor([float(rank + 1)]), "max").item()
out["bcast"] = dist.broadcast(torch.tensor([float(rank + 7)])).item()
out["gather"] = dist.all_gather_object(rank * 10)
dist.check_replicas(torch.ones(4), "ones")
try:
    dist.check_replicas(torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([2.0, 1.0]), "images")
    out["mismatch"] = None
except RuntimeError as e:
    out["mismatch"] = str(e)
dist.cleanup()
open(f"{sys.argv[1]}/rank{rank}.json", "w").write(json.dumps(out))
"""


def test_collectives_in_two_gloo_processes(tmp_path, run_python):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_python(script, tmp_path, ranks=2, timeout=300)
    for rank in range(2):
        o = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert o["rank"] == rank and o["world"] == 2
        assert o["sum"] == 3.0 and o["mean"] == 1.5 and o["max"] == 2.0 and o["bcast"] == 7.0
        assert o["gather"] == [0, 10]
        assert "replicas of images differ" in o["mismatch"]  # same sum, other order: the second checksum
