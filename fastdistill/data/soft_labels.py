"""Compact stored soft labels: teacher logits per crop in a fraction of the bytes of fp16, in safetensors shards.

FKD-style relabelling (SRe2L, RDED, FADRM) stores the teacher's logits for every crop a student will see; at fp16
that is 2 C bytes per crop (2 kB at ImageNet-1k, about 30 GB for a published run). Formats:

    fp16        the logits in half precision                                2 C bytes per row
    topk:K      the K largest probabilities at the KD temperature as 8-bit  2 K bytes per row (C <= 256),
                log-scale codes (1.8 % relative resolution down to 1e-4)   3 K (C <= 65,536)
                and their class indices in the smallest integer type; the
                remaining mass is spread evenly over the other C - K classes
    quant:B     the logits quantised to B bits (B = 8 or 4) between the     B C / 8 + 4 bytes per row
                row's min and max (two fp16 numbers)

:func:`encode` and :func:`decode` convert one batch of rows; :func:`write_shards` (or :class:`SoftLabelWriter`, batch by
batch) and :class:`SoftLabelShards` store and read them as safetensors files that a stock ``DataLoader`` reads row by
row (no patched fetcher).
"""
from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

import torch

FORMATS = ("fp16", "topk", "quant")
_QUANT_BITS = (4, 8)
# top-k probabilities are stored as round(255 ln p / ln P_MIN): a constant relative step of ln(1 / P_MIN) / 255 =
# 3.6 % (1.8 % worst-case error) whatever the class count, where a linear byte would lose the small probabilities
# of 1,000 classes at the KD temperature; probabilities below P_MIN carry no KD signal worth a byte
P_MIN = 1e-4


def parse_format(fmt: str) -> tuple[str, int | None]:
    """``fp16`` -> ("fp16", None); ``topk:5`` -> ("topk", 5); ``quant:4`` -> ("quant", 4); else one clear error."""
    kind, _, arg = str(fmt).partition(":")
    if kind == "fp16" and not arg:
        return kind, None
    if kind in ("topk", "quant") and arg.isdigit():
        n = int(arg)
        if kind == "topk" and n >= 1:
            return kind, n
        if kind == "quant" and n in _QUANT_BITS:
            return kind, n
    raise ValueError(f"unknown soft-label format {fmt!r}; expected fp16, topk:K (K >= 1) or quant:B (B in 4, 8)")


def bytes_per_row(fmt: str, num_classes: int) -> float:
    """Stored bytes of one row (one crop's labels) in ``fmt``."""
    kind, n = parse_format(fmt)
    if kind == "fp16":
        return 2.0 * num_classes
    if kind == "topk":
        return (1.0 + _index_dtype(num_classes).itemsize) * min(n, num_classes)
    return n * num_classes / 8 + 4.0


def _index_dtype(num_classes: int) -> torch.dtype:
    # the smallest type that holds every class index (safetensors has uint16 since 0.4)
    if num_classes <= 256:
        return torch.uint8
    return torch.uint16 if num_classes <= 65536 else torch.int32


def encode(logits: torch.Tensor, fmt: str, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Tensors that store ``logits`` (N, C) in ``fmt`` (``temperature``: the KD temperature top-k applies)."""
    kind, n = parse_format(fmt)
    logits = logits.detach().float()
    num_classes = logits.shape[1]
    if kind == "fp16":
        return {"logits": logits.half()}
    if kind == "topk":
        probs = torch.softmax(logits / temperature, dim=1)
        values, indices = probs.topk(min(n, num_classes), dim=1)
        codes = (values.clamp_min(P_MIN).log() / math.log(P_MIN) * 255).round().clamp(0, 255).to(torch.uint8)
        return {"prob_codes": codes, "indices": indices.to(_index_dtype(num_classes))}
    lo, hi = logits.min(1, keepdim=True).values, logits.max(1, keepdim=True).values
    levels = 2**n - 1
    # rounding lo and hi to fp16 first keeps encode and decode on the same grid
    lo, hi = lo.half().float(), hi.half().float()
    span = (hi - lo).clamp_min(torch.finfo(torch.float16).eps)
    codes = ((logits - lo) / span * levels).round().clamp(0, levels).to(torch.uint8)
    if n == 4:
        if num_classes % 2:
            codes = torch.cat([codes, codes.new_zeros(len(codes), 1)], dim=1)
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"codes": codes, "range": torch.cat([lo, hi], dim=1).half()}


def decode(tensors: dict[str, torch.Tensor], fmt: str, num_classes: int, temperature: float = 1.0) -> torch.Tensor:
    """(N, C) float32 probabilities at ``temperature`` from :func:`encode`'s tensors."""
    kind, n = parse_format(fmt)
    if kind == "fp16":
        return torch.softmax(tensors["logits"].float() / temperature, dim=1)
    if kind == "topk":
        values = torch.exp(tensors["prob_codes"].float() / 255 * math.log(P_MIN))
        indices = tensors["indices"].long()
        k = values.shape[1]
        rest = (1.0 - values.sum(1, keepdim=True)).clamp_min(0.0)
        probs = (rest / max(num_classes - k, 1)).expand(len(values), num_classes).clone()
        probs = probs.scatter_(1, indices, values)
        return probs / probs.sum(1, keepdim=True)  # rounding up may leave the k values a hair over 1
    codes = tensors["codes"]
    if n == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=2).flatten(1)[:, :num_classes]
    lo, hi = tensors["range"].float().unbind(1)
    span = (hi - lo).clamp_min(torch.finfo(torch.float16).eps)
    logits = lo[:, None] + codes.float() / (2**n - 1) * span[:, None]
    return torch.softmax(logits / temperature, dim=1)


def write_shards(folder: str | Path, logits: torch.Tensor, fmt: str, temperature: float = 1.0,
                 rows_per_shard: int = 4096) -> Path:
    """``logits`` (N, C) encoded in ``fmt`` as ``folder/shard_<k>.safetensors`` plus ``folder/index.json``."""
    with SoftLabelWriter(folder, fmt, logits.shape[1], temperature, rows_per_shard) as writer:
        writer.add(logits)
    return Path(folder)


class SoftLabelWriter:
    """Rows appended batch by batch (``add``), written as shards of ``rows_per_shard`` rows once full: memory holds
    at most one shard of logits, however many crops a relabelling pass produces. ``close`` (or leaving the ``with``
    block) writes the last shard and ``index.json``, which :class:`SoftLabelShards` reads."""

    def __init__(self, folder: str | Path, fmt: str, num_classes: int, temperature: float = 1.0,
                 rows_per_shard: int = 4096):
        parse_format(fmt)
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard!r}")
        self.folder, self.format, self.num_classes = Path(folder), fmt, int(num_classes)
        self.temperature, self.rows_per_shard = float(temperature), int(rows_per_shard)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.starts: list[int] = []
        self.rows, self.payload_bytes = 0, 0
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0

    def add(self, logits: torch.Tensor) -> None:
        """Append (n, C) logits of any float dtype and device."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"soft labels: expected (n, {self.num_classes}) logits, got {tuple(logits.shape)}")
        self._pending.append(logits.detach().float().cpu())
        self._pending_rows += len(logits)
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        from safetensors.torch import save_file

        rows = torch.cat(self._pending)
        part, rest = rows[:n], rows[n:]
        self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)
        tensors = {name: t.contiguous() for name, t in encode(part, self.format, self.temperature).items()}
        save_file(tensors, str(self.folder / f"shard_{len(self.starts):05d}.safetensors"))
        self.starts.append(self.rows)
        self.rows += len(part)
        self.payload_bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def close(self) -> Path:
        if self._pending_rows:
            self._flush(self._pending_rows)
        index = {"format": self.format, "temperature": self.temperature, "num_classes": self.num_classes,
                 "rows": self.rows, "shard_starts": self.starts,
                 "bytes_per_row": bytes_per_row(self.format, self.num_classes), "payload_bytes": self.payload_bytes}
        (self.folder / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.folder

    def __enter__(self) -> "SoftLabelWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


class SoftLabelShards(torch.utils.data.Dataset):
    """Row ``i`` of a :func:`write_shards` folder as (C,) probabilities; shards open lazily, one at a time per
    worker, so memory holds one shard whatever the number of rows."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"soft labels '{folder}' have no index.json; write them with write_shards")
        index = json.loads(index_path.read_text())
        self.format, self.temperature = index["format"], float(index["temperature"])
        self.num_classes, self.rows, self.starts = int(index["num_classes"]), int(index["rows"]), index["shard_starts"]
        self._shard: tuple[int, dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} of {self.rows}")
        k = bisect.bisect_right(self.starts, i) - 1
        if self._shard is None or self._shard[0] != k:
            from safetensors.torch import load_file

            self._shard = (k, load_file(str(self.folder / f"shard_{k:05d}.safetensors")))
        row = {name: t[i - self.starts[k]:i - self.starts[k] + 1] for name, t in self._shard[1].items()}
        return decode(row, self.format, self.num_classes, self.temperature)[0]
