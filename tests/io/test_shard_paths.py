"""Shard names in an index stay inside the checkpoint folder; symlinks the folder itself holds are followed.

The attack: a downloaded ``model.safetensors.index.json`` whose ``weight_map`` names ``../outside/x`` or an
absolute path, so that ckptdiff reads a file the user never pointed it at. The legitimate layouts that must keep
working: a Hugging Face cache snapshot (every file a symlink into ``../../blobs/``) and a user's folder of
symlinked shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from factory import llama_like, save_sharded, save_single
from typer.testing import CliRunner

from ckptdiff.cli import app
from ckptdiff.errors import InputError
from ckptdiff.io.resolve import open_stored

runner = CliRunner()
SHA = "89abcdef0123456789abcdef0123456789abcdef"


def _tiny(seed: int = 0) -> dict[str, torch.Tensor]:
    return llama_like(layers=1, d=8, ff=8, vocab=10, seed=seed)


def _evil_index(folder: Path, shard: str, index_name: str = "model.safetensors.index.json") -> Path:
    """A checkpoint folder whose index sends every tensor to ``shard`` (a name relative to ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"metadata": {}, "weight_map": dict.fromkeys(_tiny(), shard)}
    (folder / index_name).write_text(json.dumps(index))
    return folder


def _one_line_error(res: object, *needles: str) -> None:
    stderr: str = res.stderr  # type: ignore[attr-defined]
    assert res.exit_code == 2, (res.exit_code, res.output)  # type: ignore[attr-defined]
    assert stderr.startswith("ckptdiff: error:") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in stderr, stderr


@pytest.fixture
def escape(tmp_path: Path) -> tuple[Path, Path]:
    """A base whose index names ``../outside/secret.safetensors`` (a valid file, so following it would work)."""
    save_single(_tiny(), tmp_path / "outside" / "secret.safetensors")
    base = _evil_index(tmp_path / "ckpt", "../outside/secret.safetensors")
    ft = save_single(_tiny(), tmp_path / "ft" / "model.safetensors").parent
    return base, ft


COMMANDS = {
    "sparsity": ["sparsity"],
    "principal-overlap": ["principal-overlap", "--k", "2"],
    "spectral": ["spectral", "--k", "2"],
    "check": ["check", "--rule", "sparsity >= 0"],
    "check-header-only": ["check", "--header-only", "--same-keys"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_index_escaping_the_folder_is_refused_by_every_command(
    command: str, escape: tuple[Path, Path], tmp_path: Path
) -> None:
    base, ft = escape
    out = tmp_path / "out.json"
    res = runner.invoke(app, [*COMMANDS[command], str(base), str(ft), "--json", str(out), "--quiet"])
    _one_line_error(res, "../outside/secret.safetensors", "not inside the checkpoint folder")
    assert not out.exists()


def test_consistency_refuses_an_escaping_fine_tune(escape: tuple[Path, Path], tmp_path: Path) -> None:
    evil, good = escape
    res = runner.invoke(app, ["consistency", str(good), str(good), str(evil), "--quiet"])
    _one_line_error(res, "../outside/secret.safetensors")


def test_index_file_given_directly_is_checked_too(escape: tuple[Path, Path]) -> None:
    base, _ = escape
    with pytest.raises(InputError, match="not inside the checkpoint folder"):
        open_stored(str(base / "model.safetensors.index.json"))


@pytest.mark.parametrize("shard", ["{abs}", "sub/../../outside/secret.safetensors", "..", ".", ""])
def test_absolute_and_dotted_names_are_refused(shard: str, tmp_path: Path) -> None:
    secret = save_single(_tiny(), tmp_path / "outside" / "secret.safetensors")
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    base = _evil_index(tmp_path / "ckpt", shard.format(abs=secret))
    with pytest.raises(InputError, match="not inside the checkpoint folder"):
        open_stored(str(base))


def test_pickle_index_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    torch.save(_tiny(), tmp_path / "outside" / "secret.bin")
    base = _evil_index(tmp_path / "ckpt", "../outside/secret.bin", "pytorch_model.bin.index.json")
    ft = save_single(_tiny(), tmp_path / "ft.safetensors")
    res = runner.invoke(app, ["sparsity", str(base), str(ft), "--quiet"])
    _one_line_error(res, "../outside/secret.bin")


def test_harmless_dots_inside_the_folder_are_fine(tmp_path: Path) -> None:
    sd = _tiny()
    save_single(sd, tmp_path / "ckpt" / "shards" / "all.safetensors")
    _evil_index(tmp_path / "ckpt", "./shards/../shards/all.safetensors")
    src = open_stored(str(tmp_path / "ckpt"))
    assert set(src.infos) == set(sd)
    assert all(Path(i.file) == tmp_path / "ckpt" / "shards" / "all.safetensors" for i in src.infos.values())


def test_links_to_shards_stored_elsewhere_are_refused_naming_link_and_target(tmp_path: Path) -> None:
    """A folder of links to shards elsewhere is refused (issue 25: a downloaded checkpoint may carry links that
    read files the user never named); the line names the link and its target, and the store itself still works."""
    sd = _tiny()
    save_sharded(sd, tmp_path / "store", [3, len(sd) - 3])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in (tmp_path / "store").iterdir():
        if f.suffix == ".json":
            (ckpt / f.name).write_bytes(f.read_bytes())
        else:
            (ckpt / f.name).symlink_to(f)
    with pytest.raises(InputError, match="outside the checkpoint folder") as err:
        open_stored(str(ckpt))
    assert str(ckpt / "model-00001-of-00002.safetensors") in str(err.value)
    assert str(tmp_path / "store" / "model-00001-of-00002.safetensors") in str(err.value)
    res = runner.invoke(app, ["check", "--header-only", "--same-keys", str(ckpt), str(tmp_path / "store"), "-q"])
    assert res.exit_code == 2 and "outside the checkpoint folder" in res.stderr, res.output
    assert set(open_stored(str(tmp_path / "store")).infos) == set(sd)


def _hub_sharded_cache(root: Path, repo: str, sd: dict[str, torch.Tensor]) -> Path:
    """The Hugging Face cache layout: ``snapshots/<sha>/<file>`` symlinks to ``../../blobs/<hash>``."""
    folder = root / f"models--{repo.replace('/', '--')}"
    staging = root / "staging"
    save_sharded(sd, staging, [3, len(sd) - 3])
    snap = folder / "snapshots" / SHA
    snap.mkdir(parents=True)
    (folder / "blobs").mkdir()
    for f in sorted(staging.iterdir()):
        data = f.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(SHA)
    return snap


def test_hub_cache_snapshot_of_symlinks_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = _tiny()
    snap = _hub_sharded_cache(tmp_path / "cache", "acme/sharded", sd)
    assert os.path.islink(snap / "model.safetensors.index.json")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = open_stored("acme/sharded", progress=False)
    assert set(src.infos) == set(sd) and SHA in src.resolved
    res = runner.invoke(app, ["sparsity", "acme/sharded", str(snap), "--quiet", "-f", "json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["check", "--header-only", "--same-keys", str(snap), str(snap), "-q"])
    assert res.exit_code == 0, res.output


def test_hub_snapshot_index_escaping_the_snapshot_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = _hub_sharded_cache(tmp_path / "cache", "acme/evil", _tiny())
    blob = next((snap.parent.parent / "blobs").iterdir())
    (snap / "model.safetensors.index.json").unlink()
    _evil_index(snap, f"../../blobs/{blob.name}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="not inside the checkpoint folder"):
        open_stored("acme/evil", progress=False)
