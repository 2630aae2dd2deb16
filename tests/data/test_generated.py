"""Generated images through diffusers: a tiny randomly initialised Stable-Diffusion pipeline built from config (no
download), saved to a local folder and loaded by path, as ``method.gen.pipeline`` does; cls2img and img2img counts,
sources, the on-disk cache, and the one-line errors. Skipped when the ``[gen]`` extra is not installed."""
import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from fastdistill.data import build_dataset
from fastdistill.data.generated import INDEX, build_generated, build_prompts, load_pipeline


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of CLIP's BPE: printable bytes map to themselves, the rest above 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


def tiny_pipeline(folder):
    """A 2-block UNet, a 2-block VAE and a 2-layer CLIP text encoder with a byte-level tokenizer (no merges),
    randomly initialised, saved with ``save_pretrained``: 16 px images, latents 8 x 8."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tok_dir = folder.parent / "tokenizer-src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    end = vocab["<|endoftext|>"]
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=vocab["<|startoftext|>"], eos_token_id=end, pad_token_id=end))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def _gen(mode, pipeline, **kw):
    base = {"mode": mode, "pipeline": str(pipeline), "folder": None, "multiplier": 2, "strength": 0.5, "steps": 4,
            "guidance": 7.5, "resolution": None, "batch_size": 8}
    return OmegaConf.create({**base, **kw})


def test_generation_with_a_tiny_random_pipeline(tmp_path, monkeypatch):
    pytest.importorskip("diffusers", reason="the [gen] extra (diffusers) is not installed")
    pytest.importorskip("transformers", reason="the [gen] extra (transformers) is not installed")
    torch.set_num_threads(1)
    pipe_dir = tiny_pipeline(tmp_path / "tiny-sd")
    train = build_dataset(OmegaConf.create({"name": "mnist5k", "train_per_class": 400}))["train"]
    real_ids = torch.tensor([0, 401, 802])  # one digit each of classes 0, 1, 2
    prompts = build_prompts(train.classes, ['a photo of the number: "{c}".'])
    cache = tmp_path / "cache"

    img2img = build_generated(_gen("img2img", pipe_dir), train, real_ids, prompts, 0, torch.device("cpu"), cache)
    images = img2img.load()
    assert len(img2img) == 6 and images.shape == (6, 1, 28, 28) and images.dtype == torch.uint8
    assert img2img.sources == ["real:0", "real:0", "real:401", "real:401", "real:802", "real:802"]
    assert img2img.labels.tolist() == train.labels[real_ids].repeat_interleave(2).tolist()
    assert not torch.equal(images[0], images[1]), "each redraw has its own noise"

    cls2img = build_generated(_gen("cls2img", pipe_dir), train, real_ids, prompts, 0, torch.device("cpu"), cache)
    # multiplier x (real images per class, here 3 // 10 -> at least 1) per class, from the class prompts
    assert len(cls2img) == 20 and cls2img.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert cls2img.sources[6] == 'prompt:a photo of the number: "3".'
    assert (cls2img.source_ids() == -1).all()

    # the cache: both sets are on disk with their sources, and a second call never loads the pipeline
    assert len(list(cache.glob(f"*/{INDEX}"))) == 2
    import fastdistill.data.generated as generated

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the cached set must be read, not generated again")
    monkeypatch.setattr(generated, "load_pipeline", no_pipeline)
    again = build_generated(_gen("img2img", pipe_dir), train, real_ids, prompts, 0, torch.device("cpu"), cache)
    assert torch.equal(again.load(), images) and again.sources == img2img.sources
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\], got 1.5"):
        monkeypatch.undo()
        build_generated(_gen("img2img", pipe_dir, strength=1.5), train, real_ids, prompts, 0, torch.device("cpu"),
                        cache)


def test_pipeline_errors(tmp_path, monkeypatch):
    pytest.importorskip("diffusers", reason="the [gen] extra (diffusers) is not installed")
    with pytest.raises(FileNotFoundError, match="diffusion pipeline '/no/pipe' not found"):
        load_pipeline("img2img", "/no/pipe", torch.device("cpu"))
    with pytest.raises(ValueError, match="gen=cls2img needs method.gen.pipeline"):
        load_pipeline("cls2img", None, torch.device("cpu"))


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"gen=img2img needs diffusers: pip install 'fastdistill\[gen\]'"):
        load_pipeline("img2img", "/any", torch.device("cpu"))


def test_img2img_decodes_a_batch_at_a_time_and_returns_files(tmp_path, monkeypatch):
    # a stand-in pipeline that returns its input: the plumbing around diffusers, without the [gen] extra
    from types import SimpleNamespace

    import fastdistill.data.generated as generated
    from fastdistill.data.dataset import ImageDataset

    monkeypatch.setattr(generated, "load_pipeline",
                        lambda mode, path, device: lambda image, **kw: SimpleNamespace(images=image))
    taken, take = [], ImageDataset.take
    monkeypatch.setattr(ImageDataset, "take", lambda self, index: taken.append(len(index)) or take(self, index))
    train = build_dataset(OmegaConf.create({"name": "mnist5k", "train_per_class": 400}))["train"]
    real_ids = torch.tensor([0, 401, 802])
    prompts = build_prompts(train.classes, ['a photo of the number: "{c}".'])
    out = build_generated(_gen("img2img", tmp_path / "pipe", batch_size=4, resolution=28), train, real_ids, prompts, 0,
                          torch.device("cpu"), tmp_path / "cache")
    assert taken[:2] == [4, 2], f"the real images are read one generation batch at a time, got {taken}"
    assert len(out.paths) == 6 and all(p.is_file() and p.parent.parent == out.root for p in out.paths)
    assert out.dataset().images is None, "the generated set is read back as files"
    torch.testing.assert_close(out.load(), train.images[real_ids].repeat_interleave(2, 0), rtol=0, atol=1,
                               msg="an echo pipeline gives back the real images")


class _FakePipeline:
    """Stands in for diffusers' AutoPipeline classes: records how it was asked to load."""
    calls: list = []
    fail = False

    @classmethod
    def from_pretrained(cls, source, **kwargs):
        if cls.fail:
            raise OSError("not in the cache and offline")
        cls.calls.append((source, kwargs))
        return cls()

    def set_progress_bar_config(self, **_):
        pass

    def to(self, device):
        return self


def test_pipeline_from_a_folder_or_a_hub_id(tmp_path, monkeypatch):
    import types

    fake = types.SimpleNamespace(AutoPipelineForText2Image=_FakePipeline, AutoPipelineForImage2Image=_FakePipeline)
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    monkeypatch.setattr(_FakePipeline, "calls", [])
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    load_pipeline("img2img", str(tmp_path / "sd"), torch.device("cpu"))
    load_pipeline("img2img", "stabilityai/stable-diffusion-2-1", torch.device("cpu"))
    assert _FakePipeline.calls == [(str(tmp_path / "sd"), {"local_files_only": True}),
                                   ("stabilityai/stable-diffusion-2-1", {})], "a folder never downloads; an id may"
    with pytest.raises(FileNotFoundError, match="diffusion pipeline '/no/pipe' not found"):
        load_pipeline("img2img", "/no/pipe", torch.device("cpu"))
    monkeypatch.setattr(_FakePipeline, "fail", True)
    with pytest.raises(FileNotFoundError, match="'stabilityai/stable-diffusion-2-1' could not be loaded from the "
                                                "Hugging Face hub or its cache"):
        load_pipeline("cls2img", "stabilityai/stable-diffusion-2-1", torch.device("cpu"))
