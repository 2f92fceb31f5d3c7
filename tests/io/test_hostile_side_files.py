"""Hostile side files and paths: the contract for every JSON and TOML file ckptdiff reads beside the weights.

Side files are a checkpoint index (``*.index.json``, safetensors or .bin), a ``config.json``, a rules TOML
(``--config`` or ./pyproject.toml) and the ``__metadata__`` of a safetensors header; path arguments are the
checkpoints, the rules file and every output (``--csv``, ``--json``, ``report -o``). For each of them:

* it is opened only if it is a regular file (a named pipe would block forever, ``/dev/zero`` never end);
* at most a bounded number of bytes is read (:data:`ckptdiff.io.files.MAX_INDEX_BYTES` for an index,
  :data:`~ckptdiff.io.files.MAX_CONFIG_BYTES` for config.json and TOML), and a larger file is refused by its size;
* nesting is bounded before any parser, which recurses, sees it (``MAX_NESTING``; 127 in a safetensors header,
  as the safetensors library itself), and an integer longer than Python reads is refused, not a crash;
* a rule threshold must be a finite number, ``--batch-budget`` lies in its stated range, and ``--label`` is given
  once per fine-tune;
* a path too long for the system (a name over NAME_MAX, the whole over PATH_MAX) is bad input.

A refusal is exit 2 and one line naming the file, no traceback, nothing written. Cases that once hung run under
the alarm of ``hostile.py`` so that a regression fails instead of blocking; sparse files stand in for
files of several GB.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile import assert_refused
from safetensors.torch import save_file

from ckptdiff.analyses.full import full_report
from ckptdiff.errors import InputError
from ckptdiff.io import files as fileio
from ckptdiff.io.hub import stream as hub_stream

W = torch.arange(16, dtype=torch.float32)
EMBED = "model.embed_tokens.weight"  # a checkpoint with it and no lm_head.weight has its config.json read
GIB = 1024**3
DEEP = 2_000
LONG_INT = "9" * 5_001  # past Python's 4,300-digit limit for int(str)
Build = Callable[[Path], Path]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    d = tmp_path / "base"
    d.mkdir()
    save_file({"w": W, EMBED: torch.ones(4, 4)}, str(d / "model.safetensors"))
    return d


def _weights(folder: Path) -> Path:
    """``folder`` with a good model.safetensors (the base's tensors, changed)."""
    folder.mkdir(exist_ok=True)
    save_file({"w": W + 1, EMBED: torch.ones(4, 4) * 2}, str(folder / "model.safetensors"))
    return folder


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "ft"
    d.mkdir()
    return d


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _sparsity(base: Path, bad: Path, tmp_path: Path) -> list[str]:
    return [
        "sparsity",
        str(base),
        str(bad),
        "--csv",
        str(tmp_path / "out.csv"),
        "--json",
        str(tmp_path / "out.json"),
        "-q",
    ]


def _check(base: Path, ft: Path, tmp_path: Path, *args: str) -> list[str]:
    return ["check", str(base), str(ft), "--json", str(tmp_path / "out.json"), "-q", *args]


# ---------------------------------------------------------------------------------------------
# index JSON: given, or beside the weights (full reads and the output checks both read it)

INDEX = "model.safetensors.index.json"


def _index(d: Path, text: str) -> Path:
    (_weights(d) / INDEX).write_text(text)
    return d


INDEX_CASES: list[tuple[str, Build, str]] = [
    ("named pipe given", lambda d: _fifo(d / INDEX), "named pipe"),
    ("named pipe beside the weights", lambda d: _fifo(_weights(d) / INDEX).parent, "named pipe"),
    ("3 GB", lambda d: _sparse(_weights(d) / INDEX, 3 * GIB).parent, "3,221,225,472 bytes"),
    (f"nested {DEEP} deep", lambda d: _index(d, '{"weight_map":' + "[" * DEEP + "]" * DEEP + "}"), "nested more than"),
    (
        "5,001-digit integer",
        lambda d: _index(d, '{"metadata":{"total_size":' + LONG_INT + '},"weight_map":{"w":"model.safetensors"}}'),
        "4,300 digits",
    ),
]


@pytest.mark.parametrize(("build", "expect"), [c[1:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES])
def test_a_bad_index_is_refused(tmp_path: Path, base: Path, build: Build, expect: str) -> None:
    bad = build(_folder(tmp_path))
    assert_refused(_sparsity(base, bad, tmp_path), tmp_path, [INDEX], expect)


def test_a_named_pipe_as_a_bin_index_is_refused(tmp_path: Path) -> None:
    torch.save({"w": W}, tmp_path / "base.bin")
    ft = tmp_path / "ft"
    ft.mkdir()
    torch.save({"w": W + 1}, ft / "pytorch_model.bin")
    _fifo(ft / "pytorch_model.bin.index.json")
    args = _sparsity(tmp_path / "base.bin", ft, tmp_path)
    assert_refused(args, tmp_path, ["pytorch_model.bin.index.json"], "named pipe")


class _Remote:
    """The part of :class:`ckptdiff.io.hub.stream.Remote` that reading an index uses, serving ``raw`` as the index."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.sizes = {hub_stream.INDEX: len(raw)}

    def get_range(self, filename: str, pos: int, view: memoryview, what: str) -> int:
        view[:] = self.raw[pos : pos + len(view)]
        return len(self.raw)

    def where(self, filename: str) -> str:
        return f"{filename} of Hub repo org/model@0123456789ab"


@pytest.mark.parametrize(
    ("raw", "expect"),
    [
        (b'{"weight_map":' + b"[" * DEEP + b"]" * DEEP + b"}", "nested more than"),
        (b'{"metadata":{"total_size":' + LONG_INT.encode() + b'},"weight_map":{}}', "4,300 digits"),
    ],
    ids=["nested", "5,001-digit integer"],
)
def test_a_streamed_hub_index_follows_the_same_rules(raw: bytes, expect: str) -> None:
    with pytest.raises(InputError, match=expect) as caught:
        hub_stream._read_index("org/model", _Remote(raw))  # type: ignore[arg-type]
    assert hub_stream.INDEX in str(caught.value)


# ---------------------------------------------------------------------------------------------
# config.json beside the weights


def _config(d: Path, text: str) -> Path:
    (_weights(d) / "config.json").write_text(text)
    return d


CONFIG_CASES: list[tuple[str, Build, str]] = [
    ("named pipe", lambda d: _fifo(_weights(d) / "config.json").parent, "named pipe"),
    ("6 GB", lambda d: _sparse(_weights(d) / "config.json", 6 * GIB).parent, "6,442,450,944 bytes"),
    (f"nested {DEEP} deep", lambda d: _config(d, '{"x":' + "[" * DEEP + "]" * DEEP + "}"), "nested more than"),
    ("5,001-digit integer", lambda d: _config(d, '{"vocab_size":' + LONG_INT + "}"), "4,300 digits"),
]


@pytest.mark.parametrize(("build", "expect"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_config_json_is_refused(tmp_path: Path, base: Path, build: Build, expect: str) -> None:
    bad = build(_folder(tmp_path))
    assert_refused(_sparsity(base, bad, tmp_path), tmp_path, ["config.json"], expect)


# ---------------------------------------------------------------------------------------------
# rules TOML


def _rules(d: Path, text: str) -> Path:
    path = d / "rules.toml"
    path.write_text(text)
    return path


RULES_CASES: list[tuple[str, Build, str]] = [
    ("named pipe", lambda d: _fifo(d / "rules.toml"), "named pipe"),
    ("/dev/zero", lambda d: Path("/dev/zero"), "character device"),
    ("/dev/urandom", lambda d: Path("/dev/urandom"), "character device"),
    ("100 MB", lambda d: _sparse(d / "rules.toml", 100_000_000), "100,000,000 bytes"),
    (f"arrays nested {DEEP} deep", lambda d: _rules(d, "rules = " + "[" * DEEP + "]" * DEEP), "nested more than"),
    (f"tables nested {DEEP} deep", lambda d: _rules(d, "x = " + "{a = " * DEEP + "1" + "}" * DEEP), "nested more than"),
    ("5,001-digit integer", lambda d: _rules(d, f"same_keys = {LONG_INT}\n"), "4,300 digits"),
    ("threshold 1e999", lambda d: _rules(d, 'rules = ["sparsity >= 1e999"]\n'), "sparsity >= 1e999"),
    ("threshold -1e999", lambda d: _rules(d, 'rules = ["nss@w <= -1e999"]\n'), "finite number"),
]


@pytest.mark.parametrize(("build", "expect"), [c[1:] for c in RULES_CASES], ids=[c[0] for c in RULES_CASES])
def test_a_bad_rules_file_is_refused(tmp_path: Path, base: Path, build: Build, expect: str) -> None:
    rules = build(tmp_path)
    ft = _weights(tmp_path / "ft")
    assert_refused(_check(base, ft, tmp_path, "--config", str(rules)), tmp_path, [str(rules)], expect)


def test_an_infinite_threshold_on_the_command_line_is_refused(tmp_path: Path, base: Path) -> None:
    ft = _weights(tmp_path / "ft")
    line = assert_refused(_check(base, ft, tmp_path, "-r", "sparsity >= 1e400"), tmp_path, ["--rule"], "finite")
    assert "sparsity >= 1e400" in line


# ---------------------------------------------------------------------------------------------
# safetensors __metadata__: nested past the 127 levels the safetensors library reads


def _metadata(d: Path, depth: int) -> Path:
    text = '{"__metadata__":' + '{"a":' * depth + '"x"' + "}" * depth + ',"w":{"dtype":"F32","shape":[16],'
    raw = (text + '"data_offsets":[0,64]}}').encode()
    path = d / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    return path


@pytest.mark.parametrize("depth", [200, 900, 5_000])
def test_deeply_nested_metadata_is_refused(tmp_path: Path, depth: int) -> None:
    save_file({"w": W}, str(tmp_path / "base.safetensors"))
    bad = _metadata(tmp_path, depth)
    args = _sparsity(tmp_path / "base.safetensors", bad, tmp_path)
    assert_refused(args, tmp_path, [bad.name], "nested more than 127 levels")


# ---------------------------------------------------------------------------------------------
# paths too long for the system: a name over NAME_MAX, or the whole path over PATH_MAX


def _long_name(d: Path) -> Path:
    return d / ("n" * (fileio.NAME_MAX + 1))


def _deep_path(d: Path) -> Path:
    return d.joinpath(*["p" * 200] * (fileio.PATH_MAX // 200 + 1))


@pytest.mark.parametrize("make", [_long_name, _deep_path], ids=["name", "path"])
@pytest.mark.parametrize("where", ["checkpoint", "rules", "--csv", "report -o"])
def test_a_path_too_long_is_refused(tmp_path: Path, base: Path, make: Callable[[Path], Path], where: str) -> None:
    long = make(tmp_path)
    ft = _weights(tmp_path / "ft")
    args = {
        "checkpoint": _sparsity(base, long, tmp_path),
        "rules": _check(base, ft, tmp_path, "--config", str(long)),
        "--csv": ["sparsity", str(base), str(ft), "--csv", str(long), "-q"],
        "report -o": ["report", str(base), str(ft), "-o", str(long), "-q"],
    }[where]
    assert_refused(args, tmp_path, [long.name], "too long")


# ---------------------------------------------------------------------------------------------
# option values


@pytest.mark.parametrize("budget", ["inf", "1e300", "nan", "0"])
def test_batch_budget_out_of_range_is_refused(tmp_path: Path, base: Path, budget: str) -> None:
    ft = _weights(tmp_path / "ft")
    args = ["spectral", str(base), str(ft), "--batch-budget", budget, "--csv", str(tmp_path / "out.csv"), "-q"]
    assert_refused(args, tmp_path, ["--batch-budget"], "at most 1,048,576")


def test_fewer_labels_than_fine_tunes_is_refused(tmp_path: Path, base: Path) -> None:
    fts = [_weights(tmp_path / "ft1"), _weights(tmp_path / "ft2")]
    args = ["report", str(base), *map(str, fts), "--label", "a", "-o", str(tmp_path / "report"), "-q"]
    assert_refused(args, tmp_path, ["--label"], "got 1 --label value(s) for 2 fine-tuned checkpoints")
    assert not (tmp_path / "report").exists()


def test_labels_given_as_one_string_are_refused(tmp_path: Path, base: Path) -> None:
    fts = [_weights(tmp_path / "ft1"), _weights(tmp_path / "ft2")]
    with pytest.raises(InputError, match="not the string 'ab'"):
        full_report(base, fts, labels="ab", progress=False)


# ---------------------------------------------------------------------------------------------
# the nesting scan itself, against the depth of what the parsers return


def _depth(value: object) -> int:
    """Levels of lists and dicts in a parsed document, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


JSON_DOCS = [
    {"a": [[1, [2]], {"b": {"c": []}}]},
    {"[[[[": "]]]", "k": ['"[{', "\\", '\\"[', "x\\\\"], "e": ""},
    [["", ""], {"": [{}]}, '[\\"]'],
    {"weight_map": {f"model.layers.{i}.w[{i}]": "model-0001.safetensors" for i in range(200)}},
]


@pytest.mark.parametrize("doc", JSON_DOCS, ids=range(len(JSON_DOCS)))
def test_the_json_scan_counts_what_the_parser_nests(doc: object) -> None:
    for ensure_ascii in (True, False):
        raw = json.dumps(doc, ensure_ascii=ensure_ascii).encode()
        depth = _depth(json.loads(raw))
        assert [fileio.nested_deeper(raw, limit) for limit in range(6)] == [depth > limit for limit in range(6)]


def test_the_toml_scan_skips_strings_and_comments() -> None:
    text = (
        b'# [[[[ a comment\na = "x[[[[\\"[[["\nb = \'lit[[[[\'\nc = """multi\n[[[[ \\""" [[[ """\n'
        b"d = '''\n[[[[[\n'''\ne = [[1], [[2]]]  # [[[[\n[tab.le]\nf = {g = [1]}\n"
    )
    assert [fileio.nested_deeper(text, limit, toml=True) for limit in range(5)] == [True, True, True, False, False]
