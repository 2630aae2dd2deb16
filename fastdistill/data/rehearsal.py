"""An ImageNet-shaped folder of random JPEGs: rehearse a run at the users' scale on any machine, without a download.

``C`` class folders of ``k`` JPEG files each, of mixed sizes and aspect ratios (each side drawn from ``sizes``),
under ``root/train`` and ``root/test`` as ``data=imagefolder`` reads them. The content is smooth random colour
fields (a few random low-resolution tiles, upsampled): it decodes like a photo, not like white noise, and a
random-initialised network's BN statistics on it are not degenerate.

    python -m fastdistill.data.rehearsal /tmp/in1k-shaped --classes 1000 --per-class 10
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_jpeg_folder(root: str | Path, classes: int, per_class: int, test_per_class: int = 1,
                      sizes: tuple[int, int] = (300, 500), seed: int = 0, quality: int = 85) -> Path:
    """Write ``root/{train,test}/n{c:08d}/{i}.JPEG`` (ImageNet's names) and return ``root``; existing files are kept,
    so a larger ``per_class`` extends a folder."""
    root = Path(root)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = folder / f"{split}_{c}_{i}.JPEG"
                if path.is_file():
                    continue
                rng = np.random.default_rng([seed, c, i, split == "test"])
                w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
                tiles = rng.integers(0, 256, (int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3), dtype=np.uint8)
                Image.fromarray(tiles).resize((w, h), Image.BICUBIC).save(path, format="JPEG", quality=quality)
    return root


def _main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=2, help="train images per class")
    p.add_argument("--test-per-class", type=int, default=1)
    p.add_argument("--min-size", type=int, default=300)
    p.add_argument("--max-size", type=int, default=500)
    args = p.parse_args(argv)
    write_jpeg_folder(args.root, args.classes, args.per_class, args.test_per_class, (args.min_size, args.max_size))
    print(args.root)


if __name__ == "__main__":
    _main()
