"""Every file-name rule of ckptdiff: what a checkpoint's files are called, what a Hub id looks like, which files
inside a checkpoint folder ckptdiff may open (shard names from an index, links in the folder).

The names (:data:`SAFETENSORS`, :data:`PICKLE_SUFFIXES`, the two index names, the side files published beside the
weights) and the Hub-id test are spelled here once; the readers, the Hub code and the output checks ask this module.

An index is text from wherever the checkpoint came from; its ``weight_map`` names the shard files. A name
like ``../outside/secret.safetensors`` or ``/etc/...`` would make ckptdiff open a file the user never pointed
it at, so every name goes through :func:`shard_path`, the one place that turns a shard name into a path
(full reads through :mod:`ckptdiff.io.source`, ``check --header-only`` through the same resolver, and the output
checks of :mod:`ckptdiff.io.outputs`).

The name rule is lexical: a shard name must be a relative path that, normalised (``a/../b`` -> ``b``), stays
below the index's folder. Then every file the folder leads to, a shard or a ``model.safetensors`` found by its
name, goes through :func:`contained`: followed through its symlinks, it must land inside the checkpoint folder,
or, for a Hugging Face cache snapshot (``models--org--name/snapshots/REV``, a folder of links into
``../../blobs/``), inside that same cache repo folder. A link anywhere else is refused with where it points:
a checkpoint downloaded from someone else may carry links, and following them would read files the user never
named. (A file the user names directly is theirs to name, link or not.)
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

from ckptdiff.errors import InputError
from ckptdiff.io import files as fileio
from ckptdiff.log import log

SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
INDEX_SUFFIX = ".index.json"
SINGLE = "model" + SAFETENSORS  # a folder's one safetensors file
SAFETENSORS_INDEX = "model.safetensors" + INDEX_SUFFIX
PICKLE_INDEX = "pytorch_model.bin" + INDEX_SUFFIX
# A PEFT adapter folder (:mod:`ckptdiff.io.views.lora`): its config, and its factors (safetensors first, as PEFT
# writes them; the pickle of older releases otherwise).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model" + SAFETENSORS, "adapter_model.bin")
# What a checkpoint file is called; a Hub repo name ending so is a local path with a typo in it.
PATH_SUFFIXES = (SAFETENSORS, *PICKLE_SUFFIXES, ".ckpt", ".json")
# Beside the weights: what a run reads (index, config.json) or a release ships with them; no output replaces these.
SIDE_FILES = (
    f"*{SAFETENSORS}",
    f"*{INDEX_SUFFIX}",
    *(f"*{s}" for s in PICKLE_SUFFIXES),
    "config.json",
    "generation_config.json",
    ADAPTER_CONFIG,
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "*.model",
)
# What a Hub download fetches of a repo: safetensors first, pickles when there are none.
HUB_SAFETENSORS_PATTERNS = [f"*{SAFETENSORS}", f"*{SAFETENSORS}{INDEX_SUFFIX}"]
HUB_PICKLE_PATTERNS = [*(f"*{s}" for s in PICKLE_SUFFIXES), f"*.bin{INDEX_SUFFIX}"]
# Side files a Hub download fetches with the weights: config.json (FP8 block size, tied embeddings) and an
# adapter's adapter_config.json (what makes the folder a fine-tune of some base).
HUB_SIDE_FILES = ["config.json", ADAPTER_CONFIG]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as a Hub id ``org/name[@revision]`` (a path starting with ``.``, ``/`` or ``~`` never
    does; a local path that exists is a path whatever it looks like, which the caller checks first)."""
    return bool(HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def adapter_weights(folder: Path) -> Path | None:
    """The factor file of PEFT adapter folder ``folder`` (``adapter_model.safetensors``, else ``adapter_model.bin``),
    checked by :func:`contained`; None when the folder holds no ``adapter_config.json`` (it is no adapter)."""
    if not (folder / ADAPTER_CONFIG).exists():
        return None
    for name in ADAPTER_WEIGHTS:
        if (folder / name).exists():
            return contained(folder, folder / name)
    raise InputError(
        f"{folder} holds {ADAPTER_CONFIG} but neither {' nor '.join(ADAPTER_WEIGHTS)}; the adapter is incomplete: "
        "download its weights too"
    )


def missing(spec: str) -> InputError:
    """The error for an input that is neither a local path nor a Hub id, with the nearest name in its folder
    (``examples/checkpoints/rl_sed1``: did you mean ``examples/checkpoints/rl_seed1``?)."""
    near = _nearest(spec)
    hint = f"did you mean {near}? Otherwise pass" if near else "pass"
    forms = "a checkpoint file, a directory, or a Hub id like org/name[@revision]"
    return InputError(f"{spec} does not exist; {hint} {forms}")


def _nearest(spec: str) -> str:
    """The closest existing name beside a missing path ('' when none is close, or its folder is unreadable)."""
    import difflib

    path = Path(spec).expanduser()
    folder = path.parent
    try:
        names = [e.name for e in os.scandir(folder)][:10_000]  # a folder of a million files is not worth the wait
    except (OSError, ValueError):
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.75)
    if not close:
        return ""
    typed = spec.rstrip("/")
    return typed[: len(typed) - len(path.name)] + close[0]  # the folder as the user typed it, the name found


def check_spec(spec: str) -> None:
    """:class:`InputError` now for an input that cannot be opened: a path that is a link loop, a pipe or a
    device, or nothing at all and no Hub id (with the nearest name). Light (no torch): the CLI calls it before the
    analyses load, so a mistyped path fails about as fast as ``--help``; :func:`ckptdiff.io.resolve.open` says the
    same for what reaches it."""
    if fileio.stat_input(spec) is None and not is_hub_id(spec):
        raise missing(spec)


def is_pickle(name: str) -> bool:
    """Whether a file name is a PyTorch pickle (``.bin``, ``.pt``, ``.pth``)."""
    return name.lower().endswith(PICKLE_SUFFIXES)


def is_index(name: str) -> bool:
    """Whether a file name is a checkpoint index (``*.index.json``)."""
    return name.endswith(INDEX_SUFFIX)


def shard_path(index: Path, name: str) -> Path:
    """The file that shard ``name`` of ``index`` refers to; :class:`InputError` if it is not inside the folder."""
    rel = os.path.normpath(name) if name else ""
    escapes = rel in ("", ".", "..") or rel.startswith(("../", "/")) or os.path.isabs(name) or "\0" in name
    if escapes:
        raise InputError(
            f"index {index} names shard {name!r}, which is not inside the checkpoint folder {index.parent}; "
            "shard names must be relative paths within that folder: the index is corrupt or was tampered with, "
            "re-download it from a source you trust"
        )
    return contained(index.parent, index.parent / rel)


_CACHE_REPO_KINDS = ("models--", "datasets--", "spaces--")


def _roots(folder: Path) -> list[Path]:
    """Where files of ``folder`` may lead: the folder itself, and a Hub cache repo around its snapshot."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(_CACHE_REPO_KINDS):
        roots.append(real.parent.parent)
    return roots


def contained(folder: Path, path: Path) -> Path:
    """``path`` (a file inside checkpoint ``folder``) if its links lead inside the folder or its Hub cache repo."""
    real = Path(os.path.realpath(path))
    if any(real.is_relative_to(root) for root in _roots(folder)):
        return path
    raise InputError(
        f"{path} is a symbolic link to {real}, outside the checkpoint folder {folder}; ckptdiff follows links only "
        "within the checkpoint folder (or its Hugging Face cache repo): copy the file in, or pass the folder it is in"
    )


def parse_weight_map(data: object, what: str, fix: str) -> dict[str, str]:
    """The ``weight_map`` of a parsed index (local or fetched from the Hub): tensor name -> shard file name, both
    strings, or :class:`InputError` naming ``what`` (a list or a number where a shard name belongs is refused, not
    turned into text)."""
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{what} is not a valid checkpoint index (no weight_map); {fix}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InputError(
                f"{what} maps tensor {name!r} to {str(shard)[:60]}, not a shard file name; the index is corrupt: {fix}"
            )
    return weight_map


def read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    """Shards named by a ``*.index.json`` (each checked by :func:`shard_path`, each must exist) and its weight map.

    The index is a side file (:func:`ckptdiff.io.files.load_json`): a regular file of bounded size and nesting.
    """
    data = fileio.load_json(index, f"index {index}", fileio.MAX_INDEX_BYTES, "re-download it")
    weight_map = parse_weight_map(data, f"index {index}", "re-download it")
    shards: list[Path] = []
    for shard in dict.fromkeys(weight_map.values()):
        p = shard_path(index, shard)
        if not p.is_file():
            raise InputError(f"index {index} names shard {shard}, which is missing; download the missing shard")
        shards.append(p)
    return shards, weight_map


# A training run's checkpoints (``ckptdiff trajectory``) --------------------------------------------------------
#
# A run is given as checkpoints in order, a folder of step-numbered checkpoints, a glob, or Hub revisions. The step
# of a checkpoint is the one integer in its nearest name that holds any: ``checkpoint-500`` (Trainer),
# ``global_step_100/actor/huggingface`` (verl: the folders below the step hold no number), ``step_000200``,
# ``org/name@step-100`` (a Hub revision; the repo name is not looked at). A name with several integers
# (``run2-step300``) has no step.

_INTEGER = re.compile(r"\d+")
_GLOB_CHARS = re.compile(r"[*?\[]")
# Where a step folder keeps the weights it holds: in itself (Trainer's checkpoint-N), or verl's actor/huggingface.
STEP_WEIGHTS = ("", "actor/huggingface")
_WEIGHT_GLOBS = (f"*{SAFETENSORS}", f"*{INDEX_SUFFIX}", "pytorch_model*.bin")


def step_number(spec: str) -> int | None:
    """The step a checkpoint's name says (see above), or None when its nearest name with digits holds several."""
    if is_hub_id(spec) and not Path(spec).exists():
        _, _, rev = spec.partition("@")
        found = _INTEGER.findall(rev)
        return int(found[0]) if len(found) == 1 else None
    for part in reversed(Path(spec).parts):
        stem = part[: -len(SAFETENSORS)] if part.endswith(SAFETENSORS) else part
        found = _INTEGER.findall(stem)
        if found:
            return int(found[0]) if len(found) == 1 else None
    return None


def holds_weights(folder: Path) -> bool:
    """Whether ``folder`` itself holds a checkpoint's weight files (safetensors, an index, pytorch_model*.bin)."""
    return folder.is_dir() and any(any(folder.glob(g)) for g in _WEIGHT_GLOBS)


def step_checkpoint(folder: Path) -> Path | None:
    """The checkpoint inside a step folder (the folder itself, or verl's ``actor/huggingface``), or None."""
    for sub in STEP_WEIGHTS:
        inner = folder / sub if sub else folder
        if holds_weights(inner):
            return inner
    return None


def _steps_in(folder: Path) -> list[tuple[int, Path]]:
    """The step-numbered checkpoints directly below ``folder``, as (step, checkpoint path)."""
    out = []
    for child in sorted(folder.iterdir()):
        step = step_number(child.name)
        inner = step_checkpoint(child) if step is not None and child.is_dir() else None
        if step is not None and inner is not None:
            contained(folder, child)  # a step folder linked from elsewhere is not the run's to read
            out.append((step, inner))
    return out


def _refuse_repeats(found: list[tuple[int, Path]], what: str) -> None:
    seen: dict[int, Path] = {}
    for step, path in found:
        if step in seen:
            raise InputError(
                f"{what} holds two checkpoints of step {step} ({seen[step]} and {path}); pass the checkpoints "
                "you mean in order instead"
            )
        seen[step] = path


def run_checkpoints(specs: list[str]) -> list[tuple[str, int]]:
    """A run's checkpoints in order, each with its step: every input expanded and numbered (module notes above).

    An input is a folder of step-numbered checkpoints (its step folders, sorted numerically), a glob that is not a
    path (its matches, sorted numerically; quote it so the shell leaves it alone), or one checkpoint. Steps are the
    numbers in the names when every checkpoint has one and they rise in the order given (a first checkpoint with
    no number, such as the base model, is step 0 when the rest are above 0); otherwise each checkpoint's position.
    """
    paths: list[str] = []
    for spec in specs:
        p = Path(spec).expanduser()
        found = sorted(_steps_in(p)) if p.is_dir() else []
        if found:  # a run folder: its step folders, in step order
            _refuse_repeats(found, spec)
            if holds_weights(p):
                log.info(
                    f"{spec}: the checkpoint in the folder itself is not a step; pass it after the folder to add it"
                )
            paths += [str(c) for _, c in found]
        elif p.is_dir() and not holds_weights(p) and step_checkpoint(p) is None:
            raise InputError(
                f"{spec} holds no checkpoint and no step-numbered checkpoint folders (checkpoint-N, "
                "global_step_N/actor/huggingface, step_N); check the path"
            )
        elif not p.exists() and _GLOB_CHARS.search(spec.partition("@")[2]) and is_hub_id(spec.partition("@")[0]):
            raise InputError(
                f"{spec}: Hub revisions cannot be matched by a glob (ckptdiff does not list a repo's branches); "
                "name each one, e.g. org/name@step-100 org/name@step-200"
            )
        elif not p.exists() and _GLOB_CHARS.search(spec):
            matches: list[tuple[int, Path]] = []
            for m in sorted(p.parent.glob(p.name)) if not _GLOB_CHARS.search(str(p.parent)) else []:
                step = step_number(m.name)
                if step is None:
                    raise InputError(
                        f"glob {spec!r} matches {m}, whose name holds no single step number; narrow the glob or "
                        "pass the checkpoints in order"
                    )
                matches.append((step, (step_checkpoint(m) or m) if m.is_dir() else m))
            if not matches:
                raise InputError(
                    f"glob {spec!r} matches nothing (only the last part of a path may hold * ? [ ]); check it"
                )
            matches.sort()
            _refuse_repeats(matches, f"glob {spec!r}")
            paths += [str(m) for _, m in matches]
        elif p.is_dir() and not holds_weights(p):
            paths.append(str(step_checkpoint(p)))  # a verl step folder given as itself
        else:
            paths.append(spec)
    steps = [step_number(s) for s in paths]
    if steps and steps[0] is None and len(steps) > 1 and all(s is not None and s > 0 for s in steps[1:]):
        steps[0] = 0
    known = [s for s in steps if s is not None]
    rising = len(known) == len(steps) and all(a < b for a, b in itertools.pairwise(known))
    numbers = known if rising else list(range(len(paths)))
    return list(zip(paths, numbers, strict=True))
