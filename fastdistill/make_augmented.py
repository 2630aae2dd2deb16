"""Write a ``gen=folder`` of augmented real images of the train split (random affine + perspective variants with
``real:<id>`` sources): the stand-in for generated images where no diffusion weights are at hand.

    python -m fastdistill.make_augmented --out /tmp/aug --per-image 4 --real-per-class 10 [data=... overrides]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from hydra.errors import HydraException

from fastdistill.config import compose
from fastdistill.console import USER_ERRORS, fail
from fastdistill.data import build_dataset
from fastdistill.data.generated import REAL, augment_images, write_folder


def main(argv=None) -> None:
    """Write a ``gen=folder`` of augmented real images of the train split, with ``real:<id>`` sources."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", required=True, type=Path, help="folder to write (replaced if it exists)")
    p.add_argument("--per-image", type=int, default=4, help="variants per real image (4: the published 4x)")
    p.add_argument("--real-per-class", type=int, default=None,
                   help="only these real images per class, drawn as +method=kd_clip draws them with --seed "
                        "(default: every train image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="config overrides naming the data, e.g. data=imagefolder data.root=DIR")
    args = p.parse_args(argv)
    try:
        cfg = compose(["+method=kd_clip", f"seed={args.seed}", *args.overrides])
        train = build_dataset(cfg.data)["train"]
        ids = train.real_subset(args.real_per_class, args.seed)
    except USER_ERRORS as e:
        fail(e)
    except HydraException as e:
        fail(ValueError(" ".join(str(e).strip().splitlines()[:2])))
    real = train.take(ids)
    images, rows = augment_images(real, args.per_image, args.seed)
    root = write_folder(args.out, images, train.labels[ids][rows], [f"{REAL}{int(ids[r])}" for r in rows],
                        train.classes, {"made_by": "augment_images", "data": OmegaConf.to_container(cfg.data)})
    print(f"{len(rows)} images from {len(ids)} real images -> {root}")


if __name__ == "__main__":
    main()
