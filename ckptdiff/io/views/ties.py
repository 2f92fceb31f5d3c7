"""Tied embeddings: a name that holds no data of its own, because it is another tensor.

A model with ``tie_word_embeddings`` uses its input embedding as its output head. Its checkpoint shows this in one
of two ways, and a :class:`~ckptdiff.io.source.Source` records either in ``tied`` (alias -> the tensor it is), with
the alias left out of ``infos`` so that every total counts the data once:

- shared storage: ``torch.save`` of such a model writes ``lm_head.weight`` as a view of the same storage as
  ``model.embed_tokens.weight``, with the same offset, shape and stride; :class:`~ckptdiff.io.source.TorchFileSource`
  keeps the input embedding (or, for other aliases, the first name in natural order) and ties the rest to it.
  Views that overlap only in part (a fused matrix saved with its slices) are different tensors and stay;
- ``config.json``: ``save_pretrained`` drops ``lm_head.weight``; :func:`declare` (part of ``resolve.logical``) ties it
  to the one 2-D input embedding when the checkpoint's ``config.json`` says ``"tie_word_embeddings": true``, or its
  ``text_config`` does (multimodal configs); a config without the key ties only for the model types whose
  configuration class ties by default (:data:`TIED_BY_DEFAULT`: GPT-2, Gemma), since ``save_pretrained`` leaves a
  default value out.

Alignment (:mod:`ckptdiff.engine.alignment`) gives a name tied wherever it is absent no row of its own (its data is
compared once, under the name kept), and the structural status ``tie_changed`` to a name that is its own tensor on
some side and tied on another. Every report header says what is tied, and why, under ``tied`` (:func:`describe`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ckptdiff.errors import InputError
from ckptdiff.io.source import Source, Tie
from ckptdiff.io.views import config as model_config
from ckptdiff.io.views.config import ModelConfig
from ckptdiff.log import log
from ckptdiff.naming import OUTPUT_EMBEDDING, is_input_embedding, natural_key

KEY = "tie_word_embeddings"
CONFIG = f"{model_config.NAME} {KEY}"  # why a tie is known, as headers and details say it
_PURPOSE = f"its {KEY} ({OUTPUT_EMBEDDING} is absent)"
# What to do when lm_head.weight is missing, untied, from a checkpoint with an input embedding.
HINT = (
    f'a save of a tied model drops {OUTPUT_EMBEDDING}: add "{KEY}": true to its config.json, or compare with '
    f"--exclude {OUTPUT_EMBEDDING}"
)


# Model types whose configuration class defaults to tied embeddings, so that ``save_pretrained`` leaves the key
# out of config.json (it writes only values that differ from the class default) while the model is tied.
TIED_BY_DEFAULT = frozenset({"gpt2", "gemma", "gemma2", "gemma3", "gemma3_text"})


def tie_reason(config: ModelConfig) -> str:
    """Why the config ties the embeddings ('' when it does not): ``tie_word_embeddings`` true at its top level,
    else in its ``text_config``; with neither key, a model type in :data:`TIED_BY_DEFAULT`."""
    for scope, where in ((config.data, KEY), (config.data.get("text_config"), f"text_config.{KEY}")):
        value = scope.get(KEY) if isinstance(scope, dict) else None
        if value is None:
            continue
        if not isinstance(value, bool):
            raise InputError(f"{config.where}: {where} must be true or false, got {value!r}; fix the config")
        return CONFIG if value else ""
    kind = config.data.get("model_type")
    if isinstance(kind, str) and kind in TIED_BY_DEFAULT:
        return f"{model_config.NAME} model_type {kind}, tied by default"
    return ""


def declare(src: Source) -> Source:
    """Tie ``lm_head.weight`` to ``src``'s input embedding when it is absent and the config says the model is tied.

    Recorded in ``src.tied``; ``src`` itself is returned. ``config.json`` is read only when ``lm_head.weight`` is
    absent beside an input embedding; a config that ties when there is not exactly one 2-D input embedding is a
    warning, and nothing is tied.
    """
    if OUTPUT_EMBEDDING in src.infos or OUTPUT_EMBEDDING in src.tied:
        return src
    embeds = sorted((n for n in src.infos if is_input_embedding(n)), key=natural_key)
    if not embeds:
        return src
    config = model_config.load(src, _PURPOSE)
    why = tie_reason(config) if config is not None else ""
    if config is None or not why:
        return src
    matrices = [n for n in embeds if len(src.infos[n].shape) == 2]
    if len(matrices) != 1:
        log.warning(
            f"{config.where} says {KEY}, but {src.spec} has {len(matrices)} 2-D input embeddings "
            f"({', '.join(matrices) or 'none'}), not one: {OUTPUT_EMBEDDING} is tied to none of them"
        )
        return src
    src.tied[OUTPUT_EMBEDDING] = Tie(matrices[0], why)
    return src


def has_input_embedding(src: Source) -> bool:
    """Whether a checkpoint holds an input embedding (that a missing ``lm_head.weight`` may be tied to)."""
    return any(is_input_embedding(n) for n in src.infos)


def aliases(sources: Sequence[Source]) -> dict[str, str]:
    """Every tied name of the checkpoints and the tensor it is (the first checkpoint's tie where they differ)."""
    out: dict[str, str] = {}
    for src in sources:
        for alias, tie in src.tied.items():
            out.setdefault(alias, tie.to)
    return out


def describe(sources: Sequence[Source], roles: Sequence[str], most: int = 5) -> str:
    """What is tied in each checkpoint, for report headers: ``ft: lm_head.weight -> model.embed_tokens.weight
    (shared storage)``; '' when nothing is."""
    found = [
        f"{role}: {alias} -> {tie.to} ({tie.why})"
        for role, src in zip(roles, sources, strict=True)
        for alias, tie in sorted(src.tied.items(), key=lambda kv: natural_key(kv[0]))
    ]
    more = f"; ... {len(found)} in all" if len(found) > most else ""
    return "; ".join(found[:most]) + more
