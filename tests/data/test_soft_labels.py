"""Compact stored soft labels: each format decodes to the teacher's distribution within its resolution, at the
bytes it claims, and shards read back through a stock DataLoader."""
import math

import pytest
import torch

from fastdistill.data.soft_labels import (P_MIN, SoftLabelShards, SoftLabelWriter, bytes_per_row, decode, encode,
                                          parse_format, write_shards)

C = 100


def _logits(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # a teacher's logits: one confident class, a few plausible ones, a long tail
    logits = torch.randn(n, C, generator=gen)
    logits[torch.arange(n), torch.randint(0, C, (n,), generator=gen)] += 8.0
    return logits


def _kl(p, q):
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(1).max().item()


@pytest.mark.parametrize("fmt, max_kl", [("fp16", 1e-5), ("quant:8", 1e-3), ("quant:4", 5e-2), ("topk:5", 0.2),
                                         ("topk:1", 1.0)])
def test_formats_decode_to_the_teacher_distribution(fmt, max_kl):
    logits = _logits()
    exact = torch.softmax(logits.double() / 4.0, dim=1).float()
    got = decode(encode(logits, fmt, temperature=4.0), fmt, C, temperature=4.0)
    torch.testing.assert_close(got.sum(1), torch.ones(len(got)), atol=2e-3, rtol=0, msg=f"{fmt}: rows sum to 1")
    assert torch.equal(got.argmax(1), exact.argmax(1)), f"{fmt}: the top class changed"
    assert _kl(exact, got) < max_kl, f"{fmt}: KL(teacher || stored) = {_kl(exact, got):.3g} over {max_kl}"


def test_topk_keeps_its_k_probabilities_and_spreads_the_rest():
    logits = _logits(8)
    stored = encode(logits, "topk:3", temperature=1.0)
    probs = decode(stored, "topk:3", C, temperature=1.0)
    exact = torch.softmax(logits, dim=1)
    top = exact.topk(3, dim=1)
    # 8-bit log codes: half a step of ln(1 / P_MIN) / 255 relative error (1.8 %), plus the renormalisation
    half_step = math.log(1 / P_MIN) / 255 / 2
    torch.testing.assert_close(probs.gather(1, top.indices), top.values, atol=0, rtol=half_step + 2e-3)
    rest = (1 - top.values.sum(1)) / (C - 3)
    others = torch.ones_like(probs, dtype=torch.bool).scatter_(1, top.indices, False)
    torch.testing.assert_close(probs[others].view(8, C - 3), rest[:, None].expand(8, C - 3), atol=2e-3, rtol=0)


@pytest.mark.parametrize("classes, index_bytes", [(10, 1), (256, 1), (1000, 2), (70000, 4)])
def test_topk_indices_take_the_smallest_integer_type(classes, index_bytes):
    stored = encode(torch.randn(4, classes), "topk:2")
    assert stored["indices"].element_size() == index_bytes and stored["prob_codes"].dtype == torch.uint8
    assert bytes_per_row("topk:2", classes) == 2 * (1 + index_bytes)
    got = decode(stored, "topk:2", classes)
    assert torch.equal(got.topk(2, dim=1).indices.sort(1).values, stored["indices"].long().sort(1).values)
    # one byte of probability, one of class: a tenth of fp16's bytes at 10 classes
    assert bytes_per_row("topk:1", 10) == bytes_per_row("fp16", 10) / 10


@pytest.mark.parametrize("fmt", ["fp16", "topk:1", "topk:5", "quant:8", "quant:4"])
def test_stored_bytes_are_what_the_format_claims(fmt):
    stored = encode(_logits(10), fmt)
    nbytes = sum(t.numel() * t.element_size() for t in stored.values()) / 10
    assert nbytes == bytes_per_row(fmt, C), f"{fmt}: {nbytes} bytes per row stored"
    assert bytes_per_row("topk:5", C) <= bytes_per_row("fp16", C) / 10


def test_odd_class_counts_round_trip_at_4_bits():
    # 7 classes pack into 4 bytes; the padding nibble must not shift or leak into the decoded row
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    got = decode(encode(logits, "quant:4"), "quant:4", 7)
    lo, hi = logits.min(1, keepdim=True).values.half().double(), logits.max(1, keepdim=True).values.half().double()
    codes = ((logits.double() - lo) / (hi - lo) * 15).round()
    expected = torch.softmax(lo + codes / 15 * (hi - lo), dim=1)
    assert got.shape == (3, 7)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
    # 16 levels may tie the runner-up with the top class, never rank another class above it
    assert torch.equal(got.gather(1, logits.argmax(1, keepdim=True)).squeeze(1), got.max(1).values)


def test_shards_read_back_through_a_stock_dataloader(tmp_path):
    logits = _logits(50)
    write_shards(tmp_path / "labels", logits, "topk:5", temperature=4.0, rows_per_shard=16)
    assert len(list((tmp_path / "labels").glob("shard_*.safetensors"))) == 4
    shards = SoftLabelShards(tmp_path / "labels")
    loader = torch.utils.data.DataLoader(shards, batch_size=7, num_workers=0)
    got = torch.cat(list(loader))
    expected = decode(encode(logits, "topk:5", 4.0), "topk:5", C, 4.0)
    torch.testing.assert_close(got, expected, atol=0, rtol=0, msg="rows across shard boundaries")
    with pytest.raises(IndexError):
        shards[50]


def test_bad_format_is_one_clear_error(tmp_path):
    for bad in ("fp8", "topk", "topk:0", "quant:3", "quant:x"):
        with pytest.raises(ValueError, match=rf"unknown soft-label format '{bad}'; expected fp16, topk:K"):
            parse_format(bad)
    with pytest.raises(FileNotFoundError, match="have no index.json"):
        SoftLabelShards(tmp_path)


def test_writer_streams_the_same_shards_as_write_shards(tmp_path):
    logits = _logits(50)
    write_shards(tmp_path / "whole", logits, "quant:8", temperature=2.0, rows_per_shard=16)
    with SoftLabelWriter(tmp_path / "stream", "quant:8", C, temperature=2.0, rows_per_shard=16) as writer:
        for part in logits.split(7):  # batches that do not line up with the shards
            writer.add(part)
    whole, stream = SoftLabelShards(tmp_path / "whole"), SoftLabelShards(tmp_path / "stream")
    assert len(stream) == 50 and stream.starts == [0, 16, 32, 48] == whole.starts
    for i in (0, 15, 16, 49):
        torch.testing.assert_close(stream[i], whole[i], rtol=0, atol=0, msg=f"row {i}")
    assert writer.payload_bytes == 50 * bytes_per_row("quant:8", C)
