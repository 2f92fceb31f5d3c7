"""Rules from TOML: a rules file, or the ``[tool.ckptdiff]`` (or ``[tool.ckptdiff.check]``) table of pyproject.toml."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptdiff.errors import InputError
from ckptdiff.gate.rules import Rule, StructuralRules, parse_rule
from ckptdiff.io import files as fileio

_CONFIG_KEYS = ("rules", "expect_unchanged", "allow_changed", "same_keys", "same_shapes", "same_dtypes")


@dataclass(frozen=True)
class CheckConfig:
    """Rules and structural checks from the command line, a rules file or pyproject.toml."""

    rules: tuple[Rule, ...] = ()
    structural: StructuralRules = field(default_factory=StructuralRules)

    def merged(self, other: CheckConfig) -> CheckConfig:
        """Both configs together: rules and globs concatenated, boolean checks or-ed."""
        a, b = self.structural, other.structural
        return CheckConfig(
            rules=self.rules + other.rules,
            structural=StructuralRules(
                same_keys=a.same_keys or b.same_keys,
                same_shapes=a.same_shapes or b.same_shapes,
                same_dtypes=a.same_dtypes or b.same_dtypes,
                expect_unchanged=a.expect_unchanged + b.expect_unchanged,
                allow_changed=a.allow_changed + b.allow_changed,
            ),
        )


def _read_toml(path: Path) -> dict[str, Any]:
    """A rules file or pyproject.toml, read as a side file (:func:`ckptdiff.io.files.load_toml`)."""
    return fileio.load_toml(path, f"config file {path}", "fix the file or pass another one with --config")


def _strings(value: Any, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"'{key}' in {where} must be a list of strings, e.g. {key} = [\"...\"]")
    return tuple(value)


def _flag(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"'{key}' in {where} must be true or false")
    return value


def config_from_table(table: dict[str, Any], where: str) -> CheckConfig:
    """A CheckConfig from a TOML table; keys may use '-' or '_'; unknown keys are an input error."""
    values: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in _CONFIG_KEYS:
            raise InputError(f"unknown key {raw_key!r} in {where}: use {', '.join(_CONFIG_KEYS)}")
        values[key] = value
    rules = tuple(parse_rule(text, where) for text in _strings(values.get("rules", []), "rules", where))
    structural = StructuralRules(
        same_keys=_flag(values.get("same_keys", False), "same_keys", where),
        same_shapes=_flag(values.get("same_shapes", False), "same_shapes", where),
        same_dtypes=_flag(values.get("same_dtypes", False), "same_dtypes", where),
        expect_unchanged=_strings(values.get("expect_unchanged", []), "expect_unchanged", where),
        allow_changed=_strings(values.get("allow_changed", []), "allow_changed", where),
    )
    return CheckConfig(rules=rules, structural=structural)


def check_table(data: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The rules of a parsed pyproject.toml and the table's name: ``[tool.ckptdiff]`` (the documented name), or
    ``[tool.ckptdiff.check]`` when that sub-table is present (an older spelling, still read)."""
    tool = data.get("tool")
    tool = tool.get("ckptdiff") if isinstance(tool, dict) else None
    if not isinstance(tool, dict):
        return None
    if "check" in tool:
        table = tool["check"]
        return (table, "[tool.ckptdiff.check]") if isinstance(table, dict) else None
    return tool, "[tool.ckptdiff]"


def load_config(path: Path) -> CheckConfig:
    """Load a rules file (top-level keys), or a pyproject.toml's [tool.ckptdiff] (or .check) table."""
    data = _read_toml(path)
    found = check_table(data)
    if found is not None:
        return config_from_table(found[0], f"{path} {found[1]}")
    return config_from_table(data, str(path))


def pyproject_table(directory: Path) -> tuple[CheckConfig, str] | None:
    """The [tool.ckptdiff] (or .check) table of directory/pyproject.toml and where it was read (``PATH [TABLE]``);
    None when absent."""
    path = directory / "pyproject.toml"
    if not os.path.exists(path):  # not is_file(): a pipe or a device is refused when read, not skipped
        return None
    found = check_table(_read_toml(path))
    if found is None:
        return None
    where = f"{path} {found[1]}"
    return config_from_table(found[0], where), where


def load_pyproject(directory: Path) -> CheckConfig | None:
    """The [tool.ckptdiff] (or .check) table of directory/pyproject.toml; None when absent."""
    found = pyproject_table(directory)
    return None if found is None else found[0]
