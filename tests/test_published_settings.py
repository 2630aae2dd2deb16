"""`preset=paper` against docs/published_settings.yaml: every key traced, every value as the table says, every hub
name real. The table records where each published value comes from; these tests keep configs and table in step."""
from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from fastdistill.config import CONFIG_MODULE, compose, options

ROOT = Path(__file__).resolve().parents[1]
TABLE = yaml.safe_load((ROOT / "docs" / "published_settings.yaml").read_text())
PRESETS = Path(str(resources.files(CONFIG_MODULE) / "presets"))  # the installed configs, as compose reads them
PAPER_METHODS = [m for m in options("method") if (PRESETS / m / "paper.yaml").is_file()]
STATUSES = {"same", "differs", "not yet matched", "own", "unverified"}


def _flat(node, path=""):
    """(dotted key, value) of every leaf; a constructor's kwargs (``*_kwargs``) count as one value."""
    if isinstance(node, dict) and node and not path.endswith("_kwargs"):
        for key, value in node.items():
            yield from _flat(value, f"{path}.{key}" if path else str(key))
    else:
        yield path, node


def paper_keys(method: str) -> dict:
    """The traced keys of a paper config: method.*, eval.* where the method has it, precision, preset top-level keys."""
    cfg = OmegaConf.to_container(compose([f"+method={method}", "preset=paper"]), resolve=False)
    preset = yaml.safe_load((PRESETS / method / "paper.yaml").read_text())
    top = {"method", "precision", *preset} | ({"eval"} if "eval" in cfg else set())
    return dict(kv for key in sorted(top) for kv in _flat({key: cfg[key]}))


def test_every_paper_preset_has_a_table():
    assert sorted(TABLE) == sorted(PAPER_METHODS), "docs/published_settings.yaml needs one entry per paper preset"


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_paper_preset_matches_the_table(method):
    keys, rows = paper_keys(method), TABLE[method]["keys"]
    untraced, stale = sorted(set(keys) - set(rows)), sorted(set(rows) - set(keys))
    assert not untraced, f"{method}: paper-preset keys missing from docs/published_settings.yaml: {untraced}"
    assert not stale, f"{method}: table rows for keys the paper config no longer has: {stale}"
    wrong = {k: (keys[k], row["value"]) for k, row in rows.items() if keys[k] != row["value"]}
    assert not wrong, f"{method}: (config, table) values differ: {wrong}"


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_rows_say_where_and_why(method):
    for key, row in TABLE[method]["keys"].items():
        assert row["status"] in STATUSES, f"{method} {key}: unknown status {row['status']!r}"
        if row["status"] == "same":
            assert row.get("source"), f"{method} {key}: 'same' needs a source"
        if row["status"] in ("differs", "not yet matched"):
            assert row.get("source") is not None and row.get("note"), f"{method} {key}: say what differs and why"
    for row in TABLE[method].get("unkeyed", []):
        assert row["status"] in STATUSES and row["note"], f"{method} unkeyed {row['what']!r}: status and note"


def test_page_is_rendered_from_the_table():
    spec = importlib.util.spec_from_file_location("published_settings", ROOT / "docs" / "published_settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (ROOT / "docs" / "published_settings.md").read_text()
    assert page == module.render(TABLE), "docs/published_settings.md is stale: python docs/published_settings.py"


def _hub_names(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _hub_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _hub_names(value)
    elif isinstance(node, str) and node.partition(":")[0] in ("timm", "open_clip") and ":" in node:
        yield node


def test_paper_hub_names_exist_offline():
    """timm tags and open_clip (architecture, pretrained) pairs, checked against the installed registries."""
    timm = pytest.importorskip("timm")
    open_clip = pytest.importorskip("open_clip")
    timm_tagged, timm_archs = set(timm.list_pretrained()), set(timm.list_models())
    clip_pairs, clip_archs = {tuple(p) for p in open_clip.list_pretrained()}, set(open_clip.list_models())
    unknown = []
    for method in PAPER_METHODS:
        cfg = OmegaConf.to_container(compose([f"+method={method}", "preset=paper"]), resolve=False)
        for name in sorted(set(_hub_names(cfg))):
            source, _, ident = name.partition(":")
            if source == "timm":
                ok = ident in timm_tagged if "." in ident else ident in timm_archs
            else:
                arch, _, tag = ident.partition("/")
                ok = (arch, tag) in clip_pairs if tag else arch in clip_archs
            if not ok:
                unknown.append(f"{method}: {name}")
    assert not unknown, f"hub names unknown to the installed timm / open_clip: {unknown}"
