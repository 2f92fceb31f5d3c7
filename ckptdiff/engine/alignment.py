"""Alignment: pair tensors by name across checkpoints and say, from headers alone, whether they compare.

Two separate facts describe a tensor in every report:

- its structural :class:`Status` (this module): what the headers say about the name across the checkpoints
  (present everywhere with one shape, a dtype change, a shape mismatch, missing somewhere ...);
- its :class:`Outcome` in one analysis: whether that analysis measured it, and if not, why
  (not a matrix, non-finite values, ...). Outcomes are set by the analyses, never by alignment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase

from ckptdiff.errors import InputError, option
from ckptdiff.io.source import Source, TensorInfo, Tie
from ckptdiff.io.views import fp8
from ckptdiff.io.views.ties import HINT, describe, has_input_embedding
from ckptdiff.io.views.ties import aliases as tied_names
from ckptdiff.log import log
from ckptdiff.naming import OUTPUT_EMBEDDING, natural_key, selected, stacks


class Status(str, Enum):
    """Structural status of an aligned tensor. Comparable statuses are analysed; the rest are findings only."""

    OK = "ok"
    DTYPE_CHANGED = "dtype_changed"  # both float, different dtypes: compared after rounding to a common dtype
    NON_FLOAT = "non_float"  # integer/bool on every side: compared exactly
    SHAPE_MISMATCH = "shape_mismatch"
    KIND_MISMATCH = "kind_mismatch"  # float on one side, integer on the other
    ONLY_BASE = "only_base"
    ONLY_FT = "only_ft"
    MISSING = "missing"  # absent from some of several fine-tunes
    TIE_CHANGED = "tie_changed"  # own tensor on some side, tied to another (io.views.ties) on the rest
    SCALE_MISMATCH = "scale_mismatch"  # a block-scaled FP8 weight on some side, raw FP8 on another (io.views.fp8)

    def __str__(self) -> str:
        return self.value


class Outcome(str, Enum):
    """What one analysis did with one tensor."""

    ANALYSED = "analysed"
    NOT_ANALYSED = "not_analysed"  # outside the analysis's scope (1-D, integer, structural mismatch, empty)
    NON_FINITE = "non_finite"  # NaN or inf where the metric needs finite values: undefined, never a pass

    def __str__(self) -> str:
        return self.value


COMPARABLE = frozenset({Status.OK, Status.DTYPE_CHANGED, Status.NON_FLOAT})
FLOAT_COMPARED = frozenset({Status.OK, Status.DTYPE_CHANGED})


@dataclass(frozen=True)
class Aligned:
    """One tensor name across several checkpoints (index 0 is the base).

    ``ties`` (empty when none): per side, the tensor this name is tied to there (:mod:`ckptdiff.io.views.ties`);
    ``embedded`` (``lm_head.weight`` only): per side, whether that checkpoint has an input embedding;
    ``stack``: the part of the model it belongs to, from every name of the checkpoints (:func:`ckptdiff.naming.stacks`:
    '' when they have one stack).
    """

    name: str
    infos: tuple[TensorInfo | None, ...]
    status: Status
    detail: str = ""
    ties: tuple[Tie | None, ...] = ()
    embedded: tuple[bool, ...] = ()
    stack: str = ""

    @property
    def comparable(self) -> bool:
        """Whether the entries can be compared one to one."""
        return self.status in COMPARABLE

    @property
    def base(self) -> TensorInfo:
        """The base tensor's header (present for every comparable tensor)."""
        info = self.infos[0]
        assert info is not None, "base info is present for comparable tensors"  # internal invariant
        return info

    @property
    def is_float(self) -> bool:
        """Floating point on every side."""
        return all(i is not None and i.dtype.is_float for i in self.infos)

    @property
    def is_matrix(self) -> bool:
        """A comparable, non-empty floating-point 2-D tensor: what the SVD-based analyses work on."""
        return self.comparable and self.is_float and len(self.base.shape) == 2 and self.base.numel > 0

    @property
    def nbytes(self) -> int:
        """Bytes of this tensor on every side together."""
        return sum(i.nbytes for i in self.infos if i is not None)

    def project(self, sides: Sequence[int], labels: Sequence[str]) -> Aligned | None:
        """The same name seen from a subset of the checkpoints (e.g. base and one fine-tune of several); None when
        the name is tied on every one of those sides (no row there: its data is compared under the tensor it is)."""
        infos = tuple(self.infos[k] for k in sides)
        ties = tuple(self.ties[k] for k in sides) if self.ties else ()
        if ties and all(i is None and t is not None for i, t in zip(infos, ties, strict=True)):
            return None
        embedded = tuple(self.embedded[k] for k in sides) if self.embedded else ()
        status, detail = status_of(infos, labels, ties, embedded)
        return Aligned(self.name, infos, status, detail, ties, embedded, self.stack)


def status_of(
    infos: Sequence[TensorInfo | None],
    labels: Sequence[str],
    ties: Sequence[Tie | None] = (),
    embedded: Sequence[bool] = (),
) -> tuple[Status, str]:
    """The structural status of one name from its headers on every side (index 0 is the base).

    A side where the name is absent but tied to another tensor (``ties``) does not miss it: a name tied wherever
    it is absent is ``tie_changed``. ``embedded`` marks the sides with an input embedding, where a missing
    ``lm_head.weight`` gets a hint.
    """
    present = [i for i in infos if i is not None]
    if len(present) < len(infos):
        tied = {k: t for k, t in enumerate(ties) if t is not None and infos[k] is None}
        notes = [f"tied to {t.to} in {labels[k]} ({t.why})" for k, t in tied.items()]
        missing = [k for k, i in enumerate(infos) if i is None and k not in tied]
        if not missing:
            own = ", ".join(labels[k] for k, i in enumerate(infos) if i is not None)
            return Status.TIE_CHANGED, "; ".join([*notes, *([f"its own tensor in {own}"] if own else [])])
        if any(k < len(embedded) and embedded[k] for k in missing):
            notes.append(HINT)
        if len(infos) == 2:  # the side that lacks the name, neither holding nor tying it, is the other's "only"
            return (Status.ONLY_FT if missing == [0] else Status.ONLY_BASE), "; ".join(notes)
        return Status.MISSING, "; ".join(["absent from " + ", ".join(labels[k] for k in missing), *notes])
    shapes = {i.shape for i in present}
    if len(shapes) > 1:
        return Status.SHAPE_MISMATCH, " vs ".join(str(list(i.shape)) for i in present)
    kinds = {i.dtype.is_float for i in present}
    if len(kinds) > 1:
        return Status.KIND_MISMATCH, " vs ".join(i.dtype.short for i in present)
    scales = fp8.mismatch(infos, labels)
    if scales:
        return Status.SCALE_MISMATCH, scales
    if len({i.dtype.name for i in present}) > 1:
        detail = " vs ".join(i.dtype.short for i in present)
        return (Status.DTYPE_CHANGED if present[0].dtype.is_float else Status.NON_FLOAT), detail
    return (Status.OK if present[0].dtype.is_float else Status.NON_FLOAT), ""


def require_comparable(items: Sequence[Aligned], sources: Sequence[Source]) -> None:
    """Fail (exit 2) when no tensor can be compared at all, saying why: nothing to measure is not a result."""
    if not items or any(it.comparable for it in items):
        return
    counts: dict[Status, int] = {}
    for it in items:
        counts[it.status] = counts.get(it.status, 0) + 1
    ranked = sorted(counts.items(), key=lambda x: -x[1])
    why = ", ".join(f"{n} {status.value.replace('_', ' ')}" for status, n in ranked)
    names = [n for s in sources for n in s.infos]
    if any("lora_" in n or ".lora" in n for n in names):
        hint = (
            "; this looks like a LoRA adapter's weights: pass its folder (with adapter_config.json) as the fine-tune, "
            "and ckptdiff merges it into the base"
        )
    elif Status.SCALE_MISMATCH in counts:
        hint = "; fp8 weights are block-scaled on one side and raw fp8 on the other: check their *_scale_inv tensors"
    elif counts.get(Status.SHAPE_MISMATCH, 0) == len(items):
        hint = "; every shape differs: these look like different model sizes or architectures"
    else:
        hint = "; the names differ: these look like different models, or one uses another naming scheme"
    specs = " and ".join(s.spec for s in sources)
    raise InputError(f"nothing to compare between {specs}: no tensor has one shape on every side ({why}){hint}")


def _alias_hint(glob: str, aliases: dict[str, str]) -> str:
    """For a glob that selects only tied names: which tensor each is, to include instead ('' otherwise)."""
    hit = sorted((a for a in aliases if fnmatchcase(a, glob)), key=natural_key)
    if not hit:
        return ""
    to = sorted({aliases[a] for a in hit}, key=natural_key)
    names = ", ".join(to)
    return f"matches only {', '.join(hit)}, tied to {names} (one tensor, compared under that name): include {names}"


def _glob_hint(glob: str, names: Sequence[str]) -> str:
    """For a glob that matches no name: the glob with wildcards around it when that matches (``mlp`` ->
    ``*mlp*``: a glob matches full names), else ''."""
    wide = f"*{glob.strip('*')}*"
    if wide != glob and any(fnmatchcase(n, wide) for n in names):
        return f"; did you mean {wide!r}?"
    return ""


def split_globs(globs: Sequence[str]) -> list[str]:
    """``-i 'a,b' -i c`` -> ``['a', 'b', 'c']``: comma lists as ``--analyses`` takes them (no tensor name has a
    comma)."""
    return [g.strip() for given in globs for g in given.split(",") if g.strip()]


def align(
    sources: Sequence[Source],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    labels: Sequence[str] | None = None,
) -> list[Aligned]:
    """Pair tensors by name across checkpoints, filtered by globs (comma lists too), in natural name order."""
    include, exclude = split_globs(include), split_globs(exclude)
    labels = list(labels) if labels is not None else [s.spec for s in sources]
    names: dict[str, None] = {}
    for s in sources:
        names.update(dict.fromkeys(s.infos))
    for s in sources:  # a tied name absent (and untied) somewhere is a finding; tied everywhere, it has no row
        names.update(dict.fromkeys(n for n in s.tied if not all(n in o.tied for o in sources)))
    stack = stacks(names)  # from every name, so that --include/--exclude never change a tensor's stack
    out: list[Aligned] = []
    for name in sorted(names, key=natural_key):
        if not selected(name, list(include), list(exclude)):
            continue
        infos = tuple(s.infos.get(name) for s in sources)
        ties = tuple(s.tied.get(name) for s in sources)
        ties = ties if any(ties) else ()
        embedded = tuple(has_input_embedding(s) for s in sources) if name == OUTPUT_EMBEDDING else ()
        status, detail = status_of(infos, labels, ties, embedded)
        out.append(Aligned(name, infos, status, detail, ties, embedded, stack[name]))
    aliases = tied_names(sources)
    for flag, globs in (("--include", include), ("--exclude", exclude)):
        for glob in globs if out else ():  # with nothing left, the error below says it all
            if any(fnmatchcase(n, glob) for n in names):
                continue
            hint = _alias_hint(glob, aliases) if flag == "--include" else ""
            if hint:
                log.warning(f"--include {glob!r} {hint}")
            elif not any(fnmatchcase(n, glob) for n in aliases):  # excluding a tied name excludes nothing
                log.warning(
                    f"{option(flag)} {glob!r} matches no tensor name; check the glob (it matches full names)"
                    + _glob_hint(glob, list(names))
                )
    if not out and (include or exclude):
        hints = [f"{option('--include')} {g!r} {h}" for g in include if (h := _alias_hint(g, aliases))]
        wider = "".join(_glob_hint(g, list(names)) for g in include[:1] if not any(fnmatchcase(n, g) for n in names))
        raise InputError(
            "; ".join(hints)
            if hints
            else f"the {option('--include')}/{option('--exclude')} filters match no tensor; check the globs (they "
            f"match full names, e.g. 'model.layers.*.mlp.*'){wider}"
        )
    tied = describe(sources, labels)
    if tied:
        log.info(f"tied tensors, each compared once under the tensor it is: {tied}")
    return out
