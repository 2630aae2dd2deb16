"""kd_clip's losses (FD, LD, CP, zero-shot logits) against direct float64 references written out element by element;
prompt building; the source pairing of generated images; the open_clip text tower on random weights."""
import math

import pytest
import torch

from fastdistill.data.generated import build_prompts, read_folder, write_folder
from fastdistill.losses.kd import condition_prediction, feature_distillation, logit_distillation, zero_shot_logits

SHAPES = [(8, 16), (5, 7), (1, 3)]  # (N, D): regular, odd, a single sample


def _pair(seed, n, d):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(n, d, generator=g, dtype=torch.float64)
    return s, t


@pytest.mark.parametrize("n,d", SHAPES)
def test_feature_distillation_cosine_and_mse(n, d):
    s, t = _pair(n * 31 + d, n, d)
    v, w = s.detach().tolist(), t.tolist()
    cos_ref = sum(1 - sum(v[i][k] * w[i][k] for k in range(d)) /
                  (math.sqrt(sum(v[i][k] ** 2 for k in range(d))) * math.sqrt(sum(w[i][k] ** 2 for k in range(d))))
                  for i in range(n)) / n
    cos_ref = torch.tensor(cos_ref, dtype=torch.float64)
    torch.testing.assert_close(feature_distillation(s, t, "cosine"), cos_ref, atol=1e-12, rtol=0,
                               msg=lambda m: f"FD cosine value: {m}")
    mse_ref = torch.tensor(sum((v[i][k] - w[i][k]) ** 2 for i in range(n) for k in range(d)) / (n * d),
                           dtype=torch.float64)
    torch.testing.assert_close(feature_distillation(s, t, "mse"), mse_ref, atol=1e-12, rtol=0)
    # gradient of the cosine loss, by hand: d/ds (1 - s.t / (|s||t|)) = -(t / (|s||t|) - (s.t) s / (|s|^3 |t|)) / N
    feature_distillation(s, t, "cosine").backward()
    sn, tn = s.detach().norm(dim=1, keepdim=True), t.norm(dim=1, keepdim=True)
    dot = (s.detach() * t).sum(1, keepdim=True)
    grad = -(t / (sn * tn) - dot * s.detach() / (sn**3 * tn)) / n
    torch.testing.assert_close(s.grad, grad, atol=1e-12, rtol=0, msg=lambda m: f"FD cosine gradient: {m}")


def test_feature_distillation_fp32_and_bad_input():
    s, t = _pair(0, 4, 6)
    half = feature_distillation(s.detach().half(), t.half())
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match=r"must both be \(N, D\) of one shape, got \(4, 6\) and \(4, 5\)"):
        feature_distillation(s, t[:, :5])
    with pytest.raises(ValueError, match="unknown feature loss 'l1'; expected one of cosine, mse"):
        feature_distillation(s, t, "l1")


@pytest.mark.parametrize("n,c,temperature", [(8, 10, 4.0), (5, 3, 1.0), (1, 7, 0.5)])
def test_logit_distillation_is_scaled_kl(n, c, temperature):
    g = torch.Generator().manual_seed(n + c)
    s = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    t = 3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    ref = 0.0
    for i in range(n):
        zs = sum(math.exp(s[i, j].item() / temperature) for j in range(c))
        zt = sum(math.exp(t[i, j].item() / temperature) for j in range(c))
        for j in range(c):
            pt = math.exp(t[i, j].item() / temperature) / zt
            ps = math.exp(s[i, j].item() / temperature) / zs
            ref += pt * (math.log(pt) - math.log(ps))
    ref = ref / n * temperature**2
    loss = logit_distillation(s, t, temperature)
    torch.testing.assert_close(loss, torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0,
                               msg=lambda m: f"LD value: {m}")
    # known gradient of T^2 KL(p_t || p_s) w.r.t. the student logits: T (p_s - p_t) / N
    loss.backward()
    grad = temperature * ((s.detach() / temperature).softmax(1) - (t / temperature).softmax(1)) / n
    torch.testing.assert_close(s.grad, grad, atol=1e-12, rtol=0, msg=lambda m: f"LD gradient: {m}")
    assert logit_distillation(t, t, temperature).abs() < 1e-12, "KL of a distribution with itself is 0"
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        logit_distillation(s, t, 0)


def test_condition_prediction_uses_each_images_source():
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(4, 6, generator=g, dtype=torch.float64)
    student = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    source = torch.tensor([2, 0, 0, 3, 1, 2, 3])
    ref = sum(1 - torch.dot(student[i], bank[source[i]]) / (student[i].norm() * bank[source[i]].norm())
              for i in range(7)) / 7
    torch.testing.assert_close(condition_prediction(student, bank, source), ref, atol=1e-12, rtol=0)
    # pulled towards its source: the loss of image i is lowest when it equals bank[source[i]]
    perfect = bank[source].clone()
    assert condition_prediction(perfect, bank, source) < 1e-12
    assert condition_prediction(perfect, bank, source.roll(1)) > 0.1
    with pytest.raises(ValueError, match=r"source indices must be in \[0, 4\), got \[-1, 3\]"):
        condition_prediction(student, bank, torch.tensor([0, 1, 2, 3, -1, 0, 0]))


def test_zero_shot_logits_reference():
    g = torch.Generator().manual_seed(5)
    img = torch.randn(3, 4, generator=g, dtype=torch.float64)
    txt = torch.randn(5, 4, generator=g, dtype=torch.float64)
    ref = torch.tensor([[50.0 * sum(img[i, k] * txt[j, k] for k in range(4)) / (img[i].norm() * txt[j].norm())
                         for j in range(5)] for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(zero_shot_logits(img, txt, 50.0), ref, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="must share D"):
        zero_shot_logits(img, txt[:, :3])


def test_prompt_building():
    prompts = build_prompts(["3", "golden_retriever"], ["a photo of a {c}.", "{c}, blurry"])
    assert prompts == [["a photo of a 3.", "3, blurry"], ["a photo of a golden retriever.", "golden retriever, blurry"]]
    assert build_prompts(["0", "1"], ['the number: "{c}".'], ["zero", "one"]) == [['the number: "zero".'],
                                                                                ['the number: "one".']]
    with pytest.raises(ValueError, match="template 'a photo' has no '\\{c\\}' placeholder"):
        build_prompts(["0"], ["a photo"])
    with pytest.raises(ValueError, match="class_names has 1 names for 2 classes"):
        build_prompts(["0", "1"], ["{c}"], ["zero"])
    with pytest.raises(ValueError, match="templates is empty"):
        build_prompts(["0"], [])


def test_generated_folder_keeps_each_images_source(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 1, 0, 2])
    sources = ["real:17", "real:4", "prompt:a photo of a 1.", "real:17", "real:230"]
    write_folder(tmp_path / "gen", images, labels, sources, ["a", "b", "c"])
    back = read_folder(tmp_path / "gen", ["a", "b", "c"], (8, 8), 1)
    assert back.sources == sources and torch.equal(back.labels, labels)
    assert torch.equal(back.load(), images), "PNG round trip is lossless"
    assert back.source_ids().tolist() == [17, 4, -1, 17, 230]
    with pytest.raises(ValueError, match="made for classes"):
        read_folder(tmp_path / "gen", ["x", "y", "z"], (8, 8), 1)
    with pytest.raises(FileNotFoundError, match="has no index.json"):
        (tmp_path / "bare").mkdir()
        read_folder(tmp_path / "bare", ["a"], (8, 8), 1)


def test_open_clip_text_classifier_on_random_weights():
    """prompt tokens -> text embeddings -> zero-shot logits, on a randomly initialised open_clip model."""
    from fastdistill.models import create_backbone
    from fastdistill.models.clip_text import build_clip, text_classifier

    torch.manual_seed(0)
    clip = build_clip("open_clip:ViT-S-32")
    prompts = build_prompts(["0", "1", "2"], ["a photo of a {c}.", "the number {c}."])
    emb, scale = text_classifier(clip, "ViT-S-32", prompts)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3), msg=lambda m: f"class embeddings are unit rows: {m}")
    assert math.isclose(scale, clip.logit_scale.exp().item(), rel_tol=1e-6)
    # the average of the two templates, renormalised (CLIP's prompt ensembling)
    import open_clip

    tok = open_clip.get_tokenizer("ViT-S-32")
    with torch.no_grad():
        each = torch.nn.functional.normalize(clip.encode_text(tok(["a photo of a 1.", "the number 1."])), dim=-1)
    torch.testing.assert_close(emb[1], torch.nn.functional.normalize(each.mean(0), dim=0), atol=1e-5, rtol=0)
    image_tower = create_backbone("open_clip:ViT-S-32")
    with torch.no_grad():
        logits = zero_shot_logits(image_tower.embed(torch.rand(2, 3, 224, 224)), emb, scale)
    assert logits.shape == (2, 3) and logits.abs().max() <= scale + 1e-4, "|logits| <= scale (cosines times scale)"
    with pytest.raises(ValueError, match="need an open_clip teacher"):
        build_clip("timm:resnet18")
