"""DD-Ranking's label- and augmentation-robust scores (Li et al. 2025, arXiv 2505.13300), computed natively on
fastdistill's student trainer (``eval/student.py``), with model selection on a validation split.

With accuracies as fractions in [0, 1], for one seed:

    HLR = acc(full real, hard labels) - acc(distilled, hard labels)             hard-label recovery
    IOR = acc(distilled, protocol) - acc(random real twin, protocol)             improvement over random
    LRS = N(w IOR - (1 - w) HLR)                                                label-robust score
    ARS = N(w IOR_aug + (1 - w) IOR_noaug)                                      augmentation-robust score
    N(a) = (exp(a) - exp(-1)) / (exp(1) - exp(-1))

"protocol" is the method's own student training (the teachers' soft labels, KL at temperature T, its
augmentation); the random twin has as many real images per class as the distilled set, drawn per seed. IOR_aug
and IOR_noaug are IOR with and without the augmentation (random-resized-crop and flip). HLR and IOR lie in
[-1, 1], so a and its ARS counterpart do too, and N maps them onto [0, 1] (N(-1) = 0, N(1) = 1). Every score is
computed per seed and reported as mean and std over the seeds (population std, ddof 0), next to the raw
accuracies it came from.

How this differs from the DD-Ranking package (``docs/ddranking.md``): its code feeds accuracies in percent to N
(so a of +-30 points gives exp(30)), reports the best test accuracy over epochs and takes the learning rate that
maximises it, and seeds each evaluation from the wall clock. Here N sees fractions; the learning rate (one small
sweep on the distilled set, shared with its twin) and the best epoch are chosen on a validation split carved from
the training data (``data/splits.py``, stratified, seeded, recorded), and the test split is read ONCE, at the end,
by every selected student together (``eval/classify.py: accuracies``); seeds are the run's, recorded.

Cost: one sweep of ``len(lrs)`` runs per protocol (hard labels; soft labels with and without augmentation) whose
winner is also the first seed's run, then one run per further seed and per twin seed. At 3 learning rates and
3 seeds: 24 runs for the 6 rows, against the 150 of DD-Ranking's default (5 lrs x 5 rounds per row) at the same
epochs (16 %); ``cost`` in the result counts both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from omegaconf import DictConfig

from fastdistill import console
from fastdistill.data.dataset import ImageDataset
from fastdistill.data.splits import carve_validation
from fastdistill.engine.precision import Precision
from fastdistill.eval.classify import accuracies
from fastdistill.eval.student import StudentConfig, train_student
from fastdistill.models import Backbone

# DD-Ranking's default per row: 5 learning rates x 5 evaluation rounds (test checks every 20 of 300 epochs)
DDRANKING_RUNS_PER_ROW = 25


@dataclass(frozen=True)
class Row:
    """One accuracy DD-Ranking needs: which images, which targets, with or without augmentation."""
    images: str  # distilled | random | full
    targets: str  # hard | soft
    augment: bool


ROWS = {
    "full_hard": Row("full", "hard", True),
    "distilled_hard": Row("distilled", "hard", True),
    "distilled_soft": Row("distilled", "soft", True),
    "random_soft": Row("random", "soft", True),
    "distilled_soft_noaug": Row("distilled", "soft", False),
    "random_soft_noaug": Row("random", "soft", False),
}
# one lr sweep per protocol, on the distilled set; its twins take the chosen lr
SWEEPS = {"distilled_hard": ("full_hard",), "distilled_soft": ("random_soft",),
          "distilled_soft_noaug": ("random_soft_noaug",)}


# ------------------------------------------------------------------ the scores
def normalised_exp(a: float) -> float:
    """N(a) = (e^a - e^-1) / (e - e^-1): 0 at a = -1, 1 at a = +1, increasing."""
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def _fraction(name: str, acc: float) -> float:
    acc = float(acc)
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"{name} accuracy must be a fraction in [0, 1], got {acc!r} (percent? divide by 100)")
    return acc


def hard_label_recovery(full_hard: float, distilled_hard: float) -> float:
    return _fraction("full_hard", full_hard) - _fraction("distilled_hard", distilled_hard)


def improvement_over_random(distilled: float, random: float) -> float:
    return _fraction("distilled", distilled) - _fraction("random", random)


def label_robust_score(hlr: float, ior: float, weight: float = 0.5) -> float:
    """LRS = N(w IOR - (1 - w) HLR), w in [0, 1] (DD-Ranking's leaderboard: 0.5)."""
    return normalised_exp(weight * ior - (1.0 - weight) * hlr)


def augmentation_robust_score(ior_aug: float, ior_noaug: float, weight: float = 0.5) -> float:
    """ARS = N(w IOR_aug + (1 - w) IOR_noaug), w in [0, 1] (DD-Ranking's default: 0.5)."""
    return normalised_exp(weight * ior_aug + (1.0 - weight) * ior_noaug)


def scores(acc: dict, weight: float = 0.5) -> dict:
    """HLR, IOR, LRS, IOR without augmentation and ARS of one seed from its row accuracies (fractions)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"eval.weight must be in [0, 1], got {weight!r}")
    hlr = hard_label_recovery(acc["full_hard"], acc["distilled_hard"])
    ior = improvement_over_random(acc["distilled_soft"], acc["random_soft"])
    ior_noaug = improvement_over_random(acc["distilled_soft_noaug"], acc["random_soft_noaug"])
    return {"hlr": hlr, "ior": ior, "lrs": label_robust_score(hlr, ior, weight), "ior_noaug": ior_noaug,
            "ars": augmentation_robust_score(ior, ior_noaug, weight)}


def mean_std(values: list[float]) -> dict:
    """{"mean", "std" (population, ddof 0), "values"} of per-seed values."""
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std(unbiased=False).item() if len(values) > 1 else 0.0,
            "values": [float(v) for v in values]}


# ------------------------------------------------------------------ the protocol
def check_ddranking_config(e: DictConfig) -> None:
    """Bad eval.* values, one line each, before any training."""
    if isinstance(e.seeds, bool) or not isinstance(e.seeds, int) or e.seeds < 1:
        raise ValueError(f"eval.seeds must be an integer >= 1, got {e.seeds!r} (3 by default)")
    lrs = list(e.lrs)
    if not lrs or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in lrs):
        raise ValueError(f"eval.lrs must be a non-empty list of learning rates > 0, got {lrs!r}")
    if not 0.0 < float(e.val_fraction) < 1.0:
        raise ValueError(f"eval.val_fraction must be in (0, 1), got {e.val_fraction!r}")
    if isinstance(e.check_every, bool) or not isinstance(e.check_every, int) or e.check_every < 1:
        raise ValueError(f"eval.check_every must be an integer >= 1 (epochs between validation checks), "
                         f"got {e.check_every!r}")
    fpc = e.get("full_per_class")
    if fpc is not None and (isinstance(fpc, bool) or not isinstance(fpc, int) or fpc < 1):
        raise ValueError(f"eval.full_per_class must be null (every training image) or an integer >= 1, got {fpc!r}")
    if not 0.0 <= float(e.weight) <= 1.0:
        raise ValueError(f"eval.weight must be in [0, 1], got {e.weight!r}")


def random_twin(train_set: ImageDataset, per_class: torch.Tensor, seed: int) -> ImageDataset:
    """As many random real images of every class as the distilled set has (``per_class``), drawn by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c, n in enumerate(per_class.tolist()):
        pool = train_set.class_index(c)
        if pool.numel() < n:
            raise ValueError(f"class {train_set.classes[c]!r} has {pool.numel()} real training images outside the "
                             f"validation split, fewer than the {n} distilled ones")
        idx.append(pool[torch.randperm(pool.numel(), generator=g)[:n]])
    return train_set.subset(torch.cat(idx))


def ddranking_eval(distilled: ImageDataset, train_set: ImageDataset, test_set: ImageDataset,
                   teachers: list[Backbone], image_size: tuple[int, int], e: DictConfig, seed: int, hflip: bool,
                   device: torch.device, precision: Precision, num_workers="auto", progress: bool = False,
                   trainer=train_student) -> dict:
    """Every row of :data:`ROWS` for ``e.seeds`` seeds with ``e.student``, selected on a validation split, the test
    split read once at the end; the per-seed scores and their mean +- std. ``trainer`` is
    :func:`~fastdistill.eval.student.train_student` (a test passes a stand-in)."""
    check_ddranking_config(e)
    train_part, val_set, split = carve_validation(train_set, float(e.val_fraction), seed)
    num_classes = train_set.num_classes
    per_class = torch.bincount(distilled.labels, minlength=num_classes)
    seeds = [seed + k for k in range(int(e.seeds))]
    base = StudentConfig(epochs=int(e.epochs), batch_size=int(e.batch_size), lr=float(e.lrs[0]),
                         weight_decay=float(e.weight_decay), final_lr_fraction=float(e.final_lr_fraction),
                         temperature=float(e.temperature), crop_scale=tuple(e.crop_scale), hflip=hflip)
    twins = {s: random_twin(train_part, per_class, s) for s in seeds}
    full = train_part
    if e.get("full_per_class"):  # a cheaper upper bound: the same real subset for every seed, drawn by the run seed
        full = random_twin(train_part, torch.full((num_classes,), int(e.full_per_class)), seed)

    def images(row: Row, s: int) -> ImageDataset:
        return {"distilled": distilled, "random": twins[s], "full": full}[row.images]

    runs, models = [], {}

    def run(name: str, lr: float, s: int) -> dict:
        row = ROWS[name]
        cfg = replace(base, lr=lr, targets=row.targets, augment=row.augment)
        if row.images == "full":
            cfg = replace(cfg, epochs=int(e.full_epochs))
        data = images(row, s)
        r = trainer(e.student, data, teachers, None, image_size, cfg, device, precision, seed=s,
                    num_workers=num_workers, progress=progress, description=f"{name} lr {lr:g} seed {s}",
                    val_set=val_set, check_every=int(e.check_every), num_classes=num_classes)
        runs.append({"row": name, "lr": lr, "seed": s, "epochs": cfg.epochs, "images": len(data),
                     "val_acc": r["val_acc"], "best_epoch": r["best_epoch"]})
        return r

    chosen = {}
    for sweep, twin_rows in SWEEPS.items():
        # the sweep's runs are the first seed's candidates; the winner on validation is that seed's run
        best = None
        for lr in e.lrs:
            r = run(sweep, float(lr), seeds[0])
            if best is None or r["val_acc"] > best[1]["val_acc"]:  # strict: the first lr of equal ones
                best = (float(lr), r)
        lr, r = best
        chosen[sweep] = lr
        models[(sweep, seeds[0])] = r["model"]
        for s in seeds[1:]:
            models[(sweep, s)] = run(sweep, lr, s)["model"]
        for twin in twin_rows:
            twin_lr = float(e.full_lr) if twin == "full_hard" and e.get("full_lr") else lr
            chosen[twin] = twin_lr
            for s in seeds:
                models[(twin, s)] = run(twin, twin_lr, s)["model"]

    # selection is over: the test split is read once, by all selected students together
    test = accuracies(models, test_set, device, image_size, precision, num_workers=num_workers, progress=progress)
    per_seed = []
    for s in seeds:
        acc = {name: test[(name, s)] for name in ROWS}
        per_seed.append({"seed": s, "accuracy": acc, **scores(acc, float(e.weight))})
    summary = {name: mean_std([p["accuracy"][name] for p in per_seed]) for name in ROWS}
    score_summary = {k: mean_std([p[k] for p in per_seed]) for k in ("hlr", "ior", "lrs", "ior_noaug", "ars")}
    return {"student": e.student, "seeds": seeds, "weight": float(e.weight), "lr": chosen,
            "validation": split, "accuracy": summary, "scores": score_summary, "per_seed": per_seed,
            "runs": runs, "cost": cost(runs), "test_reads": 1}


def cost(runs: list[dict]) -> dict:
    """Student epochs (and image-epochs) of these runs against DD-Ranking's default for the same rows at the same
    epochs per run (5 lrs x 5 rounds), as a fraction."""
    rows = {}
    for r in runs:
        rows.setdefault(r["row"], r)
    epochs = sum(r["epochs"] for r in runs)
    image_epochs = sum(r["epochs"] * r["images"] for r in runs)
    ref_epochs = sum(DDRANKING_RUNS_PER_ROW * r["epochs"] for r in rows.values())
    ref_image_epochs = sum(DDRANKING_RUNS_PER_ROW * r["epochs"] * r["images"] for r in rows.values())
    return {"runs": len(runs), "ddranking_runs": DDRANKING_RUNS_PER_ROW * len(rows), "epochs": epochs,
            "ddranking_epochs": ref_epochs, "fraction_epochs": epochs / ref_epochs,
            "fraction_image_epochs": image_epochs / ref_image_epochs}


def result_rows(result: dict) -> list[list[str]]:
    """The printed table: raw accuracies, then the scores, each mean +- std over the seeds."""
    def fmt(v: dict) -> str:
        return f"{v['mean']:.4f} +- {v['std']:.4f}"

    rows = [[f"acc {name}", fmt(v), f"lr {result['lr'][name]:g}"] for name, v in result["accuracy"].items()]
    rows += [[k.upper(), fmt(v), ""] for k, v in result["scores"].items()]
    return rows


def print_result(result: dict, title: str, out) -> None:
    console.print_results(f"{title}: DD-Ranking scores ({result['student']}, seeds {result['seeds']}, accuracies "
                          f"as fractions; cost {result['cost']['fraction_epochs']:.0%} of DD-Ranking's default)",
                          ["row / score", "mean +- std", "selected"], result_rows(result), out)
