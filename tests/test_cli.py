"""The command line as a user meets it: help, printed config, and one-line errors with exit code 2."""
import subprocess
import sys

import pytest


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastdistill.run", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_help_lists_groups():
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    from fastdistill.recipes import RECIPES

    assert "fastdistill" in r.stdout and f"method: {', '.join(sorted(RECIPES))}" in r.stdout


def test_cfg_job_prints_the_preset_over_the_method():
    r = cli("+method=teacher", "preset=smoke", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    assert "epochs: 1" in r.stdout and "name: teacher" in r.stdout
    r = cli("+method=teacher", "preset=smoke", "method.epochs=3", "--cfg", "job")
    assert "epochs: 3" in r.stdout, "a command-line key must win over the preset"


@pytest.mark.parametrize("args, message", [
    (["+method=lgn"], "ValueError: unknown method 'lgn'; expected one of"),
    ([], "ValueError: no method given; add +method=NAME"),
    (["+method=teacher", "data=nope"], "ValueError: unknown dataset 'nope'"),
    (["+method=teacher", "preset=fast"], "ValueError: unknown preset 'fast'"),
    (["+method=teacher", "data=imagefolder"], "ValueError: data=imagefolder needs data.root=DIR"),
    (["+method=teacher", "data=imagefolder", "data.root=/no/such/dir"], "FileNotFoundError: data.root '/no/such/dir'"),
    (["+method=teacher", "ipc=0"], "ValueError: ipc must be an integer >= 1"),
    (["+method=teacher", "model=timm:no_such_net"], "ValueError: unknown timm model 'no_such_net'"),
    (["+method=teacher", "model=tf:resnet"], "ValueError: unknown backbone source 'tf'"),
    (["+method=teacher", "method.pretrained=/ckpt/dino_s16.pth"],
     "FileNotFoundError: pretrained weights '/ckpt/dino_s16.pth' not found"),
    (["+method=teacher", "precision=fp8"], "ValueError: unknown precision 'fp8'"),
    (["+method=teacher", "seed=abc"], "ValueError: seed must be an integer >= 0, got 'abc'"),
    (["+method=teacher", "seed=1.5"], "ValueError: seed must be an integer >= 0, got 1.5"),
    (["+method=fadrm", "ipc=ten"], "ValueError: ipc must be an integer >= 1, got 'ten'"),
    (["+method=teacher", "method.optimizer.lr=fast"],
     "ValueError: method.optimizer.lr must be a number > 0.0, got 'fast'"),
    (["+method=teacher", "method.optimizer.lr=0"], "ValueError: method.optimizer.lr must be a number > 0.0, got 0"),
    (["+method=teacher", "method.epochs=-1"], "ValueError: method.epochs must be an integer >= 0, got -1"),
    (["+method=teacher", "method.epochs=2.5"], "ValueError: method.epochs must be an integer >= 0, got 2.5"),
    (["+method=teacher", "method.batch_size=0"], "ValueError: method.batch_size must be an integer >= 1, got 0"),
    (["+method=lgm", "method.image_size=-32"], "ValueError: method.image_size must be an integer >= 1, got -32"),
    (["+method=lgm", "method.iterations=many"], "ValueError: method.iterations must be an integer >= 0, got 'many'"),
    (["+method=fadrm", "method.iterations=5"], "ValueError: Could not override 'method.iterations'. To append to"),
    (["+method=teacher", "checkpoint_every=-5"], "ValueError: checkpoint_every must be an integer >= 0, got -5"),
])
def test_one_line_errors(args, message, tmp_path):
    r = cli(*args, f"out={tmp_path / 'run'}", "progress=false")
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr[-2000:]}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_corrupt_image_is_one_line(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "data" / split / c / "ok.png")
    (tmp_path / "data" / "train" / "a" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    r = cli("+method=teacher", "data=imagefolder", f"data.root={tmp_path / 'data'}", f"out={tmp_path / 'run'}")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("ValueError: corrupt image file") and "bad.jpg" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _folder(root, classes, n=2):
    from PIL import Image

    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (10 * i, 20, 30)).save(root / split / c / f"{i}.png")
    return root


def test_out_inside_the_dataset_is_one_line(tmp_path):
    data = _folder(tmp_path / "data", ["a", "b"])
    r = cli("+method=teacher", "data=imagefolder", f"data.root={data}", f"out={data / 'train' / 'runs'}")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "lies inside data.root" in lines[0], r.stderr[-2000:]
    assert not (data / "train" / "runs").exists(), "the check must come before anything is written"


def test_a_single_class_dataset_is_one_line(tmp_path):
    data = _folder(tmp_path / "data", ["only"])
    r = cli("+method=teacher", "data=imagefolder", f"data.root={data}", f"out={tmp_path / 'run'}", "progress=false")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ValueError: ") and "at least 2 classes" in lines[0], r.stderr


@pytest.mark.parametrize("args, message", [
    (["data=nosuch"], "unknown dataset 'nosuch'"),
    (["--real-per-class", "100000"], "fewer than 100000"),
])
def test_make_augmented_bad_input_is_one_line(args, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastdistill.make_augmented", "--out", str(tmp_path / "aug"), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "aug").exists()


def test_readme_error_example_is_the_real_message():
    """The README quotes the unknown-method error; it must list every method, as the command prints them."""
    import re
    from pathlib import Path

    from fastdistill.config import compose

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quoted = re.search(r"`ValueError: (unknown method 'lgn'; expected one of [^`]*)`", readme)
    assert quoted, "README.md quotes the unknown-method error"
    with pytest.raises(ValueError) as e:
        compose(["+method=lgn"])
    assert quoted.group(1) == str(e.value)
