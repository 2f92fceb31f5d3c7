"""ckptdiff check rules: parsing, metric rules, structural rules, config loading and rendering."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from ckptdiff.errors import InputError
from ckptdiff.gate import (
    METRICS,
    CheckConfig,
    CheckResult,
    Rule,
    RuleResult,
    StructuralRules,
    check_scopes,
    evaluate,
    exit_code,
    load_config,
    load_pyproject,
    parse_rule,
    required_analyses,
    to_dict,
    to_markdown,
)

UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
INV_FREQ = "model.layers.0.self_attn.rotary_emb.inv_freq"


def _sparsity() -> pd.DataFrame:
    # Float tensors: Σchanged = 460 over Σnumel = 2100 (the only_ft row is not compared, inv_freq is an integer
    # buffer); the mlp scope has 400 of 800. "changed" is nullable Int64, as the sparsity analysis writes it.
    frame = pd.DataFrame(
        [
            (EMBED, "ok", 1000, 0),
            (UP, "ok", 400, 300),
            (DOWN, "ok", 400, 100),
            (Q, "ok", 200, 50),
            (NORM, "dtype_changed", 100, 10),
            (INV_FREQ, "non_float", 10, 0),
            ("lm_head.weight", "only_ft", 500, math.nan),
        ],
        columns=["tensor", "status", "numel", "changed"],
    )
    return frame.astype({"numel": "Int64", "changed": "Int64"})


def _principal() -> pd.DataFrame:
    return pd.DataFrame(
        [
            (UP, "ok", 400, 300, 200, 200, 100, 120, 180, 60, 0.45, 0.55, 0.2, 1.0),
            (DOWN, "ok", 400, 100, 200, 200, 100, 50, 50, 10, 0.5, 0.5, 0.5, 3.0),
            (Q, "ok", 200, 0, 100, 100, 50, 0, 0, 0, math.nan, math.nan, math.nan, 0.0),
        ],
        columns=[
            "tensor",
            "status",
            "numel",
            "changed",
            "principal_size",
            "low_size",
            "principal_not_low_size",
            "changed_principal",
            "changed_low",
            "changed_principal_not_low",
            "baseline_principal_magnitude",
            "baseline_low_magnitude",
            "energy_principal",
            "delta_fro_sq",
        ],
    )


def _spectral() -> pd.DataFrame:
    angles = ["angle_u_max_deg", "angle_v_max_deg", "angle_u_mean_deg", "angle_v_mean_deg"]
    return pd.DataFrame(
        [
            (UP, "ok", 1e-4, 1.0, 2.0, 0.5, 0.5),
            (DOWN, "ok", 5e-4, 3.0, 1.0, 1.5, 0.5),
            (Q, "ok", 2e-3, 7.0, 4.0, 2.0, 1.0),
            (NORM, "ok", math.nan, math.nan, math.nan, math.nan, math.nan),
        ],
        columns=["tensor", "status", "nss", *angles],
    )


def _frames() -> dict[str, pd.DataFrame]:
    return {"sparsity": _sparsity(), "principal": _principal(), "spectral": _spectral()}


def _one(text: str, frames: dict[str, pd.DataFrame] | None = None) -> RuleResult:
    return evaluate([parse_rule(text)], _frames() if frames is None else frames).results[0]


# ---------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sparsity >= 0.5", Rule("sparsity", None, ">=", 0.5)),
        ("  sparsity>=.5  ", Rule("sparsity", None, ">=", 0.5)),
        ("sparsity@model.layers.*.mlp.* >= 0.3", Rule("sparsity", "model.layers.*.mlp.*", ">=", 0.3)),
        ("changed @ model.embed_tokens.weight == 0", Rule("changed", EMBED, "==", 0.0)),
        ("nss@*.self_attn.* < 1e-3", Rule("nss", "*.self_attn.*", "<", 1e-3)),
        ("nss<1.5E-05", Rule("nss", None, "<", 1.5e-5)),
        ("ratio_principal <= 1.0", Rule("ratio_principal", None, "<=", 1.0)),
        ("angle_u_max_deg > -2", Rule("angle_u_max_deg", None, ">", -2.0)),
        ("density@model.layers.[!1].* != 0", Rule("density", "model.layers.[!1].*", "!=", 0.0)),
    ],
)
def test_parse_rule(text: str, expected: Rule) -> None:
    assert parse_rule(text) == expected


def test_rule_prints_in_canonical_form() -> None:
    assert str(parse_rule(" nss@*.self_attn.*<1e-3")) == "nss@*.self_attn.* < 0.001"
    assert str(parse_rule("changed <= 123456789")) == "changed <= 123456789"
    assert str(parse_rule("nss < 1.2345678e-7")) == "nss < 1.2345678e-07"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sparsity",
        "sparsity >= ",
        "sparsity => 0.5",
        "sparsity = 0.5",
        ">= 0.5",
        "sparsity >= half",
        "a b >= 1",
        "sparsity@ >= 0.5",
        "sparsity >= 0.5 extra",
        "sparsity >= nan",
    ],
)
def test_malformed_rule_is_an_input_error_showing_the_form(text: str) -> None:
    with pytest.raises(InputError) as info:
        parse_rule(text)
    assert repr(text) in str(info.value)
    assert "METRIC[@GLOB] OP VALUE" in str(info.value)


def test_unknown_metric_lists_known_metrics() -> None:
    with pytest.raises(InputError) as info:
        parse_rule("sparsness >= 0.5")
    message = str(info.value)
    assert "'sparsness'" in message
    assert all(name in message for name in METRICS)


def test_required_analyses_only_what_the_rules_need() -> None:
    assert required_analyses([parse_rule("sparsity >= 0.5"), parse_rule("changed@x == 0")]) == {"sparsity"}
    assert required_analyses([parse_rule("nss < 1"), parse_rule("ratio_low > 1")]) == {"spectral", "principal"}
    assert required_analyses([], StructuralRules(same_keys=True)) == {"sparsity"}
    assert required_analyses([], StructuralRules()) == set()


# ---------------------------------------------------------------------------------------------
# Metric rules


def test_sparsity_overall_is_parameter_weighted_over_float_tensors() -> None:
    result = _one("sparsity >= 0.75")
    assert result.value == pytest.approx(1 - 460 / 2100)
    assert result.passed and result.n_tensors == 5 and result.offenders == ()


def test_scoped_sparsity_fails_with_worst_tensors_first() -> None:
    result = _one("sparsity@model.layers.*.mlp.* >= 0.6")
    assert result.value == pytest.approx(0.5)
    assert not result.passed
    assert [(o.tensor, o.value) for o in result.offenders] == [(UP, 0.25)]  # DOWN (0.75) passes on its own


def test_density_and_changed_rules() -> None:
    assert _one("density@model.layers.* <= 0.5").value == pytest.approx(450 / 1000)
    assert _one(f"changed@{EMBED} == 0").passed
    failing = _one("changed@model.* == 0")
    assert failing.value == 460 and not failing.passed
    assert [o.tensor for o in failing.offenders] == [UP, DOWN, Q, NORM]  # most changed first; EMBED has 0
    assert _one(f"changed@{INV_FREQ} == 0").n_tensors == 1  # integer tensors count for changed


def test_principal_overlap_and_ratio_rules_weight_by_updated_entries() -> None:
    assert _one("overlap_principal < 0.5").value == pytest.approx(170 / 400)
    assert _one("overlap_low > 0.5").value == pytest.approx(230 / 400)
    assert _one("ratio_principal <= 1.0").value == pytest.approx(170 / 200)  # expected 300·0.5 + 100·0.5
    low = _one("ratio_low <= 1.0")
    assert low.value == pytest.approx(230 / 200) and not low.passed
    assert [(o.tensor, o.value) for o in low.offenders] == [(UP, pytest.approx(1.2))]  # DOWN's 1.0 passes alone
    magnitude = _one("ratio_principal_magnitude < 1")
    assert magnitude.value == pytest.approx(170 / (300 * 0.45 + 100 * 0.5)) and magnitude.passed
    assert _one("ratio_low_magnitude > 1").value == pytest.approx(230 / (300 * 0.55 + 100 * 0.5))
    assert _one("overlap_principal_not_low < 1").value == pytest.approx(70 / 400)
    assert _one("ratio_principal_not_low < 1").value == pytest.approx(70 / (300 * 0.25 + 100 * 0.25))


def test_energy_principal_is_weighted_by_update_energy() -> None:
    assert _one("energy_principal < 1").value == pytest.approx((0.2 * 1.0 + 0.5 * 3.0) / 4.0)


def test_ratio_over_a_scope_where_nothing_changed_fails_as_undefined() -> None:
    result = _one(f"ratio_principal@{Q} <= 1.0")
    assert math.isnan(result.value) and not result.passed
    assert "undefined" in result.note and result.offenders == ()


def test_spectral_rules_take_the_worst_matrix() -> None:
    assert _one("nss@*.mlp.* < 1e-3").passed
    nss = _one("nss < 1e-3")
    assert nss.value == pytest.approx(2e-3) and not nss.passed and nss.n_tensors == 3
    assert [o.tensor for o in nss.offenders] == [Q]  # the only matrix above 1e-3 on its own
    assert _one("angle_u_max_deg < 5").value == 7.0
    assert _one("angle_v_max_deg < 5").passed
    assert _one("angle_u_mean_deg <= 2").passed
    assert not _one("angle_v_mean_deg < 1").passed


def test_equality_rule_offenders_are_farthest_from_the_value() -> None:
    result = _one("angle_u_max_deg@*.layers.* == 3")
    assert not result.passed
    assert [o.tensor for o in result.offenders] == [Q, UP]  # |7-3| > |1-3|; DOWN equals 3 and passes alone


def test_scope_matching_nothing_is_an_input_error() -> None:
    with pytest.raises(InputError, match="matches no tensor"):
        _one("sparsity@model.layer.*.mlp.* >= 0.3")


def test_scope_matching_only_tensors_without_values_is_an_input_error() -> None:
    with pytest.raises(InputError, match="none has a nss value"):
        _one(f"nss@{NORM} < 1")
    with pytest.raises(InputError, match="none has a sparsity value"):
        _one("sparsity@lm_head.* >= 0")
    with pytest.raises(InputError, match="none has a sparsity value"):
        _one(f"sparsity@{INV_FREQ} >= 0")  # integer buffers are outside sparsity, as in the sparsity report


def test_unknown_metric_in_a_constructed_rule_is_an_input_error() -> None:
    with pytest.raises(InputError, match="use one of"):
        evaluate([Rule("bogus", None, "<", 1.0)], _frames())


def test_missing_frame_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="no spectral frame"):
        evaluate([parse_rule("nss < 1")], {"sparsity": _sparsity()})


# ---------------------------------------------------------------------------------------------
# Structural rules


def _structural_frame() -> pd.DataFrame:
    # Columns and detail strings as ckptdiff.engine.reader / analyses.sparsity write them.
    frame = pd.DataFrame(
        {
            "tensor": ["a.weight", "b.weight", "c.weight", "d.weight", "e.bias", "f.weight", "g.ids", "h.mask"],
            "status": [
                "ok",
                "only_base",
                "only_ft",
                "shape_mismatch",
                "dtype_changed",
                "ok",
                "non_float",
                "kind_mismatch",
            ],
            "detail": ["", "", "", "[2, 5] vs [5, 2]", "fp32 vs bf16", "", "i32 vs i64", "bf16 vs bool"],
            "dtype_base": ["bf16", "bf16", "", "bf16", "fp32", "bf16", "i32", "bf16"],
            "dtype_ft": ["bf16", "", "bf16", "bf16", "bf16", "bf16", "i64", "bool"],
            "numel": [10, 10, 10, 10, 10, 10, 4, 4],
            "changed": [3, None, None, None, 0, 0, 0, None],
        }
    )
    return frame.astype({"numel": "Int64", "changed": "Int64"})


def _structural(**kwargs: Any) -> list[RuleResult]:
    return list(evaluate([], {"sparsity": _structural_frame()}, StructuralRules(**kwargs)).results)


def test_same_keys_lists_missing_and_extra_keys() -> None:
    (result,) = _structural(same_keys=True)
    assert not result.passed and result.value == 2
    assert [(o.tensor, o.detail) for o in result.offenders] == [
        ("b.weight", "only in base"),
        ("c.weight", "only in fine-tune"),
    ]
    clean = _structural_frame().iloc[[0, 3, 4, 5, 6, 7]]
    assert evaluate([], {"sparsity": clean}, StructuralRules(same_keys=True)).passed


def test_same_shapes_and_dtypes() -> None:
    shapes, dtypes = _structural(same_shapes=True, same_dtypes=True)
    assert [(o.tensor, o.detail) for o in shapes.offenders] == [("d.weight", "[2, 5] vs [5, 2]")]
    assert [(o.tensor, o.detail) for o in dtypes.offenders] == [
        ("e.bias", "fp32 vs bf16"),
        ("g.ids", "i32 vs i64"),
        ("h.mask", "bf16 vs bool"),
    ]
    clean = _structural_frame().iloc[[0, 5]]
    assert evaluate([], {"sparsity": clean}, StructuralRules(same_shapes=True, same_dtypes=True)).passed


def test_expect_unchanged() -> None:
    failing, passing = _structural(expect_unchanged=("[ab].weight", "[ef].*"))
    assert failing.rule == "unchanged@[ab].weight" and not failing.passed
    assert [(o.tensor, o.value, o.detail) for o in failing.offenders] == [
        ("b.weight", None, "only in base"),
        ("a.weight", 3.0, "changed"),
    ]
    assert passing.passed and passing.n_tensors == 2  # a dtype change alone is same_dtypes' business


def test_allow_changed() -> None:
    (passing,) = _structural(allow_changed=("a.*", "[bcdh].*"))
    assert passing.passed and passing.n_tensors == 3 and passing.rule == "only_changed@a.*,[bcdh].*"
    (failing,) = _structural(allow_changed=("[bc].weight",))
    assert [(o.tensor, o.detail) for o in failing.offenders] == [
        ("d.weight", "shape changed"),  # not comparable first, by name
        ("h.mask", "float on one side only"),
        ("a.weight", "changed"),
    ]


def test_structural_glob_matching_nothing_is_an_input_error() -> None:
    with pytest.raises(InputError, match=re.escape("expect_unchanged 'z.*' matches no tensor")):
        _structural(expect_unchanged=("z.*",))
    with pytest.raises(InputError, match=re.escape("allow_changed 'z.*' matches no tensor")):
        _structural(allow_changed=("a.*", "z.*"))


def test_check_scopes_fails_early_on_an_unmatched_glob() -> None:
    names = [UP, DOWN]
    check_scopes([parse_rule("sparsity@*.mlp.* > 0")], StructuralRules(expect_unchanged=(UP,)), names)
    with pytest.raises(InputError, match="matches no tensor"):
        check_scopes([parse_rule("sparsity@*.attn.* > 0")], None, names)
    with pytest.raises(InputError, match="allow_changed"):  # called from Python: the keyword's name
        check_scopes([], StructuralRules(allow_changed=("x",)), names)


# ---------------------------------------------------------------------------------------------
# Configuration


def test_rules_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        'rules = ["sparsity >= 0.5", "nss@*.self_attn.* < 1e-3"]\n'
        'expect-unchanged = ["model.embed_tokens.weight"]\n'
        "allow_changed = []\n"
        "same_keys = true\n"
    )
    config = load_config(path)
    assert config.rules == (Rule("sparsity", None, ">=", 0.5), Rule("nss", "*.self_attn.*", "<", 1e-3))
    assert config.structural == StructuralRules(same_keys=True, expect_unchanged=(EMBED,))


def test_pyproject_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.ckptdiff.check]\nrules = ["changed@lm_head.weight == 0"]\nsame_dtypes = true\n'
    )
    config = load_pyproject(tmp_path)
    assert config == CheckConfig(
        rules=(Rule("changed", "lm_head.weight", "==", 0.0),), structural=StructuralRules(same_dtypes=True)
    )
    assert load_config(tmp_path / "pyproject.toml") == config  # --config may point at a pyproject.toml too


def test_pyproject_absent_or_without_table(tmp_path: Path) -> None:
    assert load_pyproject(tmp_path) is None
    (tmp_path / "pyproject.toml").write_text("[tool.ruff]\nline-length = 120\n")
    assert load_pyproject(tmp_path) is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("rules = [\n", "not valid TOML"),
        ('rule = ["sparsity >= 0.5"]\n', "unknown key 'rule'"),
        ('rules = "sparsity >= 0.5"\n', "must be a list of strings"),
        ('rules = ["sparsity >> 0.5"]\n', "cannot parse rule 'sparsity >> 0.5' from .*rules.toml"),
        ("same_keys = 1\n", "must be true or false"),
    ],
)
def test_bad_rules_file_is_an_input_error(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        load_config(path)


def test_missing_rules_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_merged_configs_concatenate() -> None:
    a = CheckConfig((Rule("nss", None, "<", 1.0),), StructuralRules(same_keys=True, expect_unchanged=("x",)))
    b = CheckConfig((Rule("sparsity", None, ">", 0.5),), StructuralRules(allow_changed=("y",), expect_unchanged=("z",)))
    merged = a.merged(b)
    assert merged.rules == a.rules + b.rules
    assert merged.structural == StructuralRules(same_keys=True, expect_unchanged=("x", "z"), allow_changed=("y",))


# ---------------------------------------------------------------------------------------------
# Rendering


def _mixed_result() -> CheckResult:
    rules = [parse_rule(t) for t in ("sparsity >= 0.75", "sparsity@*.mlp.* >= 0.6", f"ratio_principal@{Q} <= 1")]
    frames = _frames()
    frames["sparsity"] = pd.concat([frames["sparsity"], _structural_frame().iloc[[1]]])
    return evaluate(rules, frames, StructuralRules(same_keys=True))


def test_markdown_summary() -> None:
    expected = """\
## ckptdiff check: FAIL (1/4 rules pass)

| rule | value | threshold | result |
|---|---|---|---|
| `sparsity >= 0.75` | 0.780952 | >= 0.75 | PASS |
| `sparsity@*.mlp.* >= 0.6` | 0.5 | >= 0.6 | FAIL |
| `ratio_principal@model.layers.0.self_attn.q_proj.weight <= 1` | n/a | <= 1 | FAIL |
| `same_keys` | 2 (tensors on one side only) | == 0 | FAIL |

**`sparsity@*.mlp.* >= 0.6`** worst tensors:

- `model.layers.0.mlp.up_proj.weight`: 0.25

**`same_keys`** worst tensors:

- `b.weight`: only in base
- `lm_head.weight`: only in fine-tune

Note on `ratio_principal@model.layers.0.self_attn.q_proj.weight <= 1`: undefined over this scope \
(Σchanged_principal / Σ(changed·principal_size/numel): observed over random-expected intersection).
"""
    assert to_markdown(_mixed_result()) == expected


def test_markdown_escapes_pipes_and_counts_truncated_offenders() -> None:
    result = evaluate([parse_rule("changed@model.* == 0")], _frames(), max_offenders=2)
    text = to_markdown(result)
    assert "| `changed@model.* == 0` | 460 | == 0 | FAIL |" in text
    assert "worst tensors:" in text and text.count("\n- ") == 2


def test_json_dict_is_plain_and_nan_free() -> None:
    result = _mixed_result()
    data = to_dict(result)
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["passed"] is False and data["exit_code"] == 1
    assert data["rules"][2]["value"] is None
    assert data["rules"][1]["offenders"][0] == {"tensor": UP, "value": 0.25, "detail": ""}


def test_exit_code() -> None:
    assert exit_code(evaluate([parse_rule("sparsity >= 0.5")], _frames())) == 0
    assert exit_code(_mixed_result()) == 1
    assert exit_code(evaluate([], _frames())) == 0


def test_pyproject_flat_tool_ckptdiff_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.ckptdiff]\nrules = ["sparsity >= 0.5"]\nsame_keys = true\n')
    cfg = load_pyproject(tmp_path)
    assert cfg is not None and [str(r) for r in cfg.rules] == ["sparsity >= 0.5"] and cfg.structural.same_keys


@pytest.mark.parametrize("table", ["[tool.ckptdiff]", "[tool.ckptdiff.check]"])
def test_the_origin_names_the_table_it_read(tmp_path: Path, table: str) -> None:
    """Both spellings are read; the header's rules_from says which one was (issue 23 item 12)."""
    from ckptdiff.gate.check import gather_config

    (tmp_path / "pyproject.toml").write_text(f'{table}\nrules = ["sparsity >= 0.5"]\n')
    gathered = gather_config(None, CheckConfig(), cwd=tmp_path)
    assert gathered.origin == f"{tmp_path / 'pyproject.toml'} {table}"
    assert [str(r) for r in gathered.config.rules] == ["sparsity >= 0.5"]


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b"tool = 5\n", False),  # not a table: no ckptdiff rules, not a crash
        (b"[tool]\nckptdiff = 5\n", False),
        (b"[tool.ckptdiff]\nrules = ['sparsity >= 0.5']\n", True),
    ],
)
def test_pyproject_shapes_that_hold_no_rules_are_not_errors(tmp_path: Path, content: bytes, found: bool) -> None:
    (tmp_path / "pyproject.toml").write_bytes(content)
    assert (load_pyproject(tmp_path) is not None) == found


def test_a_rules_file_that_is_not_utf8_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_bytes(b"rules = ['sparsity \xff >= 0.5']\n")
    with pytest.raises(InputError, match="not UTF-8"):
        load_config(path)
