"""--rollups-csv and JSON tables: machine keys beside the titles, counts as integers (issue 23 item 14)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from factory import save_single

import ckptdiff
from ckptdiff.analyses.base import to_json_dict
from ckptdiff.render.text import to_rollups_csv


def _pair(tmp_path: Path) -> tuple[str, str]:
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(8, 4, generator=g) for i in range(2)}
    base["model.norm.weight"] = torch.ones(4)
    ft = {k: v.clone() for k, v in base.items()}
    ft["model.layers.1.mlp.up_proj.weight"][0, :3] += 1.0  # 3 of 32 entries changed, in layer 1 only
    return str(save_single(base, tmp_path / "b.safetensors")), str(save_single(ft, tmp_path / "f.safetensors"))


def test_rollups_csv_has_machine_keys_and_integer_counts(tmp_path: Path) -> None:
    report = ckptdiff.sparsity(*_pair(tmp_path), progress=False).report()
    rows = list(csv.DictReader(io.StringIO(to_rollups_csv(report))))
    keys = {r["table"]: r["key"] for r in rows}
    assert keys["Per module type"] == "by_module" and keys["Per layer"] == "by_layer"
    assert keys["Sparsity, layer x module (linear matrices)"] == "layer_x_module"
    assert keys["Overall (parameter-weighted)"] == "overall"
    up = next(r for r in rows if r["key"] == "by_module" and r["module"] == "up")
    assert (up["numel"], up["changed"]) == ("64", "3")  # not 64.0 and 3.0
    overall = {r["figure"]: r["overall"] for r in rows if r["key"] == "overall"}
    assert (overall["numel"], overall["changed"], overall["tensors"]) == ("68", "3", "3")
    assert float(overall["sparsity"]) == 1 - 3 / 68


def test_json_tables_keep_integers_and_map_machine_keys(tmp_path: Path) -> None:
    doc = to_json_dict(ckptdiff.sparsity(*_pair(tmp_path), progress=False).report())
    assert doc["table_keys"]["by_module"] == "Per module type"
    assert {k: doc["table_keys"][k] for k in ("overall", "by_layer")} == {
        "overall": "Overall (parameter-weighted)",
        "by_layer": "Per layer",
    }
    figures = {r["figure"]: r["overall"] for r in doc["tables"][doc["table_keys"]["overall"]]}
    assert type(figures["changed"]) is int and figures["changed"] == 3
    per_layer = doc["tables"]["Per layer"]
    assert [(r["layer"], r["changed"]) for r in per_layer] == [(0, 0), (1, 3)]
    assert all(type(r["numel"]) is int for r in per_layer)
