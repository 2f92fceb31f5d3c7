"""PEFT LoRA adapters as fine-tunes: an adapter folder read as the full checkpoint its merge would give.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``) with,
per adapted module ``P`` (PEFT's key ``base_model.model.P``, the adapter name removed), the factors
``P.lora_A.weight`` (r × in) and ``P.lora_B.weight`` (out × r); an embedding has ``P.lora_embedding_A``
(r × vocab) and ``P.lora_embedding_B`` (dim × r); DoRA adds ``P.lora_magnitude_vector``; ``lora_bias`` adds
``P.lora_B.bias``. Any other tensor (``modules_to_save``, an embedding saved whole) is a full tensor that replaces
the base's of the same name. :class:`Adapter` is that folder as stored (the factors, with the parsed config).

:func:`merge` presents it beside its base as the checkpoint ``merge_and_unload`` would give, one matrix at a time
(:class:`MergedSource`): the base's tensor names, where each adapted weight is

    W' = W + s · ΔW,   ΔW = B A            (Linear; transposed to W's layout when ``fan_in_fan_out``)
                       ΔW = (B A)ᵀ         (Embedding)
    s  = alpha / r, or alpha / √r with ``use_rslora``; r and alpha per module from ``rank_pattern`` /
         ``alpha_pattern`` (the first key K, in the file's order, such that the module path matches
         ``(.*\\.)?K`` in full, as PEFT matches them)
    DoRA: W' = m / ‖W + s ΔW‖ · (W + s ΔW), the norm taken per output feature (over the input axis; an
          embedding's per embedding dimension), ``m`` the stored magnitude, as PEFT's merge computes it

computed in fp32 from the stored factors (the sum in fp64 for an fp64 base) and rounded once to the merged dtype
(``--merged-dtype``; the base tensor's dtype by default), and a bias ``b' = b + s · b_B`` for ``lora_bias``.
Every other tensor is the base's, read once: :meth:`MergedSource.derived_from` tells the reader that the entries
come from the base tensor of the same name, so the pass that reads the base hands its bytes over
(:meth:`MergedSource.derive`) instead of reading them a second time; an adapted matrix is the base's bytes plus
ΔW, formed once per matrix and never written.

Refused, each in one line naming the adapter: a ``peft_type`` other than LORA (IA3, LoHa, LoKr, VeRA, ...), a
config that contradicts the tensors (a rank that is not the factors' rank, DoRA without magnitudes or magnitudes
without DoRA, a factor without its partner, a tensor the LoRA layout does not name), and a base the adapter does
not fit (a module missing from the base, or a shape the factors do not give), naming the first such module and the
adapter's ``base_model_name_or_path``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptdiff import choices, dtypes
from ckptdiff.dtypes import DType
from ckptdiff.errors import InputError
from ckptdiff.io import files as fileio
from ckptdiff.io.source import Source, TensorInfo
from ckptdiff.naming import natural_key

PREFIX = "base_model.model."  # PEFT's prefix of every saved key (a PeftModel around the base model)
_FACTOR = re.compile(  # lora_A has no bias in PEFT: only lora_B's (lora_bias) is a part
    r"^(?P<path>.+)\.(?:(?P<part>lora_A|lora_B)\.weight|lora_B\.(?P<bias>bias)"
    r"|(?P<emb>lora_embedding_A|lora_embedding_B)|(?P<mag>lora_magnitude_vector)(?:\.weight)?)$"
)
SUPPORTED = "LORA"
_FIX_CONFIG = "fix adapter_config.json or re-save the adapter with peft"


@dataclass(frozen=True)
class AdapterConfig:
    """What ``adapter_config.json`` says about the merge."""

    where: str
    peft_type: str
    r: int
    alpha: float
    rslora: bool
    dora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model: str  # base_model_name_or_path, '' when absent

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """(r, alpha) of module ``path``: its ``rank_pattern`` / ``alpha_pattern`` entries, else the defaults."""
        return _pattern(self.rank_pattern, path, self.r), _pattern(self.alpha_pattern, path, self.alpha)

    def scaling(self, r: int, alpha: float) -> float:
        """s = alpha / r, or alpha / √r with rsLoRA."""
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    @property
    def base_named(self) -> str:
        """The base the adapter names, for messages."""
        return f"its base_model_name_or_path is {self.base_model!r}" if self.base_model else "it names no base"


def _pattern_regex(key: str) -> str:
    """PEFT's regex for a ``rank_pattern`` / ``alpha_pattern`` key: ``(.*\\.)?(K)``, matched against the whole path."""
    return rf"(.*\.)?({key})"


def _pattern(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rule: the first key K (in order) whose regex matches the whole module path (keys checked by
    :func:`_patterns`)."""
    for key, value in patterns.items():
        if re.fullmatch(_pattern_regex(key), path):
            return value
    return default


def _get(
    data: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str, null: bool = True
) -> Any:
    """``data[key]`` when of type ``kind``, ``default`` when absent (or null, where ``null``: PEFT reads a null
    flag or pattern as false or empty, but fails on a null rank or alpha); InputError for any other value."""
    value = data.get(key, default)
    if value is None and null:
        value = default
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise InputError(f"{where}: {key} is {value!r}, not what PEFT writes there; {_FIX_CONFIG}")
    return value


def _patterns(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> dict[str, Any]:
    raw = _get(data, key, dict, {}, where)
    for k, v in raw.items():
        number = isinstance(v, kind) and isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (number and math.isfinite(v) and v > 0):
            raise InputError(f"{where}: {key}[{k!r}] is {v!r}, not a finite positive number; {_FIX_CONFIG}")
        try:
            re.compile(_pattern_regex(k))
        except re.error as e:  # PEFT fails on it too; skipping it would change that module's r or alpha silently
            raise InputError(f"{where}: {key} key {k!r} is not a regular expression ({e}); {_FIX_CONFIG}") from None
    return dict(raw)


def read_config(path: Path) -> AdapterConfig:
    """Parse ``adapter_config.json``; :class:`InputError` for a type other than LoRA or a value PEFT never writes."""
    where = str(path)
    data = fileio.load_json(path, f"adapter config {where}", fileio.MAX_CONFIG_BYTES, _FIX_CONFIG)
    if not isinstance(data, dict):
        raise InputError(f"{where} is not a JSON object; {_FIX_CONFIG}")
    kind = data.get("peft_type")
    if not isinstance(kind, str):
        raise InputError(f"{where} names no peft_type; ckptdiff reads LoRA adapters (peft_type LORA): {_FIX_CONFIG}")
    if kind.upper() != SUPPORTED:
        raise InputError(
            f"{where}: peft_type {kind} is not supported; ckptdiff merges LoRA adapters only (peft_type LORA, "
            f"DoRA and rsLoRA included): merge this {kind} adapter into its base with peft's merge_and_unload and "
            "compare the merged checkpoint"
        )
    for unsupported in ("layer_replication", "target_parameters", "trainable_token_indices"):
        if data.get(unsupported):
            raise InputError(
                f"{where}: {unsupported} is set, which ckptdiff does not merge; merge the adapter with peft's "
                "merge_and_unload and compare the merged checkpoint"
            )
    r = _get(data, "r", int, 8, where, null=False)
    alpha = _get(data, "lora_alpha", (int, float), 8, where, null=False)
    if r <= 0 or not (math.isfinite(alpha) and alpha > 0):
        raise InputError(f"{where}: r={r!r}, lora_alpha={alpha!r}; both must be positive: {_FIX_CONFIG}")
    base = data.get("base_model_name_or_path")
    return AdapterConfig(
        where=where,
        peft_type=kind.upper(),
        r=r,
        alpha=float(alpha),
        rslora=_get(data, "use_rslora", bool, False, where),
        dora=_get(data, "use_dora", bool, False, where),
        fan_in_fan_out=_get(data, "fan_in_fan_out", bool, False, where),
        rank_pattern={k: int(v) for k, v in _patterns(data, "rank_pattern", int, where).items()},
        alpha_pattern={k: float(v) for k, v in _patterns(data, "alpha_pattern", (int, float), where).items()},
        base_model=base if isinstance(base, str) else "",
    )


class Adapter(Source):
    """A PEFT adapter folder as stored: its factor tensors (keys as saved) and its parsed config."""

    def __init__(self, spec: str, inner: Source, config: AdapterConfig):
        super().__init__(spec, inner.resolved, dict(inner.infos), dict(inner.tied))
        self.inner = inner
        self.config = config

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        return self.inner.read(name, start, count, out)

    def close(self) -> None:
        self.inner.close()

    def abandon_reads(self) -> None:
        self.inner.abandon_reads()


def _module_key(stored: str) -> str:
    """A saved key without PEFT's ``base_model.model.`` prefix and a ``base_layer`` level."""
    key = stored.removeprefix(PREFIX)
    return key.replace(".base_layer.", ".")


@dataclass(frozen=True)
class Module:
    """One adapted module: its factors (stored names), rank, scaling, and the base tensors it changes."""

    path: str  # the module's path in the base model
    embedding: bool
    a: str
    b: str
    magnitude: str | None
    bias: str | None  # lora_B.bias (lora_bias)
    r: int
    alpha: float
    scaling: float

    @property
    def weight(self) -> str:
        return f"{self.path}.weight"


class MergedSource(Source):
    """A base checkpoint with an adapter merged in: FT = W + ΔW per adapted matrix, the base elsewhere."""

    def __init__(self, adapter: Adapter, base: Source, merged_dtype: torch.dtype | None = None):
        self.adapter = adapter
        self.base = base
        self.config = adapter.config
        self.modules, self.full = _parse(adapter)
        self.out_dtype: dict[str, DType] = {}  # adapted name -> the dtype it is presented in
        self._targets: dict[str, Module] = {}  # adapted tensor name (weight or bias) -> its module
        self._check_fit(merged_dtype)
        infos = dict(base.infos)
        for name, dtype in self.out_dtype.items():  # a plain tensor: whatever the base stored, W + ΔW is values
            infos[name] = TensorInfo(name, dtype, tuple(base.infos[name].shape), adapter.spec)
        for name, stored in self.full.items():
            infos[name] = dataclasses.replace(adapter.infos[stored], name=name, file=adapter.spec)
        tied = {alias: tie for alias, tie in base.tied.items() if alias not in infos}
        super().__init__(adapter.spec, self._describe(merged_dtype), infos, tied, viewed=True)
        self._lock = threading.Lock()
        self._cached: tuple[str, torch.Tensor] | None = None  # (name, ΔW or a whole DoRA result, flat fp32)

    # -- what the adapter is

    def _check_fit(self, merged_dtype: torch.dtype | None) -> None:
        """Every adapted module exists in the base with the shape its factors give; the dtypes presented."""
        cfg, infos = self.config, self.adapter.infos
        for m in self.modules:
            w = self.base.infos.get(m.weight)
            if w is None and m.weight in self.base.tied:
                raise InputError(
                    f"adapter {self.adapter.spec} adapts {m.weight}, which base {self.base.spec} ties to "
                    f"{self.base.tied[m.weight].to}; ckptdiff does not merge a LoRA into a tied tensor: merge it "
                    "with peft's merge_and_unload and compare the merged checkpoint"
                )
            if w is None:
                raise self._wrong_base(m, f"the base has no tensor {m.weight}")
            if m.weight in self.full:
                raise InputError(
                    f"adapter {self.adapter.spec} holds both LoRA factors for {m.path} and a whole {m.weight} "
                    f"({self.full[m.weight]}); the adapter is inconsistent: re-save it with peft"
                )
            a, b = infos[m.a].shape, infos[m.b].shape
            # Linear: A (r, in), B (out, r), W (out, in) or (in, out) with fan_in_fan_out; Embedding: A (r, vocab),
            # B (dim, r), W (vocab, dim). The magnitude (DoRA) and lora_B.bias have one entry per row of B.
            want = (a[1], b[0]) if (m.embedding or cfg.fan_in_fan_out) else (b[0], a[1])
            if tuple(w.shape) != want:
                why = f"its factors give a {list(want)} update, the base's {m.weight} is {list(w.shape)}"
                if not m.embedding and tuple(w.shape) == want[::-1]:  # PEFT sets it from the layer: Conv1D only
                    flip = str(not cfg.fan_in_fan_out).lower()
                    why += f" (they fit it with fan_in_fan_out {flip}: check that value in {cfg.where})"
                raise self._wrong_base(m, why)
            if not w.dtype.is_float:
                raise self._wrong_base(m, f"the base's {m.weight} is {w.dtype.short}, not floating point")
            for per_output in (m.magnitude, m.bias):
                if per_output is not None and infos[per_output].shape != (b[0],):
                    raise InputError(
                        f"adapter {self.adapter.spec}: {per_output} has shape {list(infos[per_output].shape)}, not "
                        f"[{b[0]}] (one entry per output feature); the adapter is corrupt: re-save it"
                    )
            self._present(m.weight, w, merged_dtype, m)
            if m.bias is not None:
                bias = self.base.infos.get(f"{m.path}.bias")
                if bias is None or tuple(bias.shape) != (b[0],):
                    raise self._wrong_base(m, f"its lora_B.bias needs a [{b[0]}] {m.path}.bias in the base")
                self._present(bias.name, bias, merged_dtype, m)

    def _present(self, name: str, info: TensorInfo, merged_dtype: torch.dtype | None, m: Module) -> None:
        dtype = info.dtype if merged_dtype is None else dtypes.from_torch(merged_dtype)
        assert dtype is not None
        self.out_dtype[name] = dtype
        self._targets[name] = m

    def _wrong_base(self, m: Module, why: str) -> InputError:
        return InputError(
            f"adapter {self.adapter.spec} does not fit base {self.base.spec}: module {m.path}: {why}; "
            f"{self.config.base_named}: pass that model as the base"
        )

    def _describe(self, merged_dtype: torch.dtype | None) -> str:
        cfg = self.config
        ranks = sorted({m.r for m in self.modules})
        alphas = sorted({m.alpha for m in self.modules})
        r = f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}..{ranks[-1]}"
        alpha = f"alpha={alphas[0]:g}" if len(alphas) == 1 else f"alpha={alphas[0]:g}..{alphas[-1]:g}"
        s = "(alpha/sqrt(r))" if cfg.rslora else "(alpha/r)"
        formula = f"W + {s} B A"
        if cfg.dora:
            formula = f"m * ({formula}) / ||{formula}|| (DoRA)"
        parts = [f"adapter {self.adapter.spec}", r, alpha, f"{len(self.modules)} modules", f"merged as {formula}"]
        if self.full:
            parts.append(f"{len(self.full)} full tensors replaced (modules_to_save)")
        if merged_dtype is not None:
            parts.append(f"merged weights stored as {dtypes.short_name(merged_dtype)}")
        parts.append(f"from {self.adapter.resolved}")
        return ", ".join(parts)

    # -- reading

    def derived_from(self, name: str) -> Source | None:
        if name in self.full or name not in self.base.infos:
            return None
        return self.base

    def derive(self, name: str, given: torch.Tensor, start: int = 0, count: int | None = None) -> torch.Tensor:
        m = self._targets.get(name)
        if m is None:
            return given  # untouched: the base's own entries
        n = self.infos[name].numel - start if count is None else count
        if self.config.dora and name == m.weight:  # the norm needs whole rows: the merged matrix, formed once
            whole = given if start == 0 and n == self.infos[name].numel else None
            return self._merged_dora(m, whole)[start : start + n].to(self.infos[name].dtype.torch)
        delta = self._delta(name, m)[start : start + n]
        work = _work_dtype(given.dtype)
        return (given.to(work) + delta.to(work)).to(self.infos[name].dtype.torch)

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        if name in self.full:
            return self.adapter.read(self.full[name], start, count, out)
        if name not in self._targets:
            return self.base.read(name, start, count, out)
        n = self.infos[name].numel - start if count is None else count
        return self.derive(name, self.base.read(name, start, n), start, n)

    def _factors(self, m: Module) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.adapter.read_full(m.a).to(torch.float32)
        b = self.adapter.read_full(m.b).to(torch.float32)
        return a, b

    def _delta(self, name: str, m: Module) -> torch.Tensor:
        """s · ΔW of ``name`` in the base tensor's layout, flat fp32; the last one kept for the next piece."""
        with self._lock:
            if self._cached is not None and self._cached[0] == name:
                return self._cached[1]
            self._cached = None
            if name == m.weight:
                a, b = self._factors(m)
                delta = b @ a
                if m.embedding or self.config.fan_in_fan_out:
                    delta = delta.T
                flat = (delta * m.scaling).reshape(-1).contiguous()
            else:  # the bias of lora_bias
                assert m.bias is not None
                flat = self.adapter.read(m.bias).to(torch.float32) * m.scaling
            self._cached = (name, flat)
            return flat

    def _merged_dora(self, m: Module, given: torch.Tensor | None) -> torch.Tensor:
        """DoRA's merged weight, flat fp32: m / ‖W + s ΔW‖ · (W + s ΔW), the norm per output feature; from the
        base weight ``given`` whole (flat), or, when a piece was given, from the base weight read whole here (a
        second read of its bytes: only DoRA matrices read in pieces, by sparsity alone, pay it)."""
        key = f"dora:{m.weight}"
        with self._lock:
            if self._cached is not None and self._cached[0] == key:
                return self._cached[1]
        shape = self.base.infos[m.weight].shape
        w = self.base.read_full(m.weight) if given is None else given.reshape(shape)
        work = _work_dtype(w.dtype)
        merged = w.to(work) + self._delta(m.weight, m).reshape(shape).to(work)
        assert m.magnitude is not None
        magnitude = self.adapter.read(m.magnitude).to(work)
        outputs_on_rows = not (m.embedding or self.config.fan_in_fan_out)  # the output axis of W's layout
        if outputs_on_rows:
            merged = merged * (magnitude / torch.linalg.vector_norm(merged, dim=1)).reshape(-1, 1)
        else:
            merged = merged * (magnitude / torch.linalg.vector_norm(merged, dim=0)).reshape(1, -1)
        flat = merged.reshape(-1).contiguous()
        with self._lock:
            self._cached = (key, flat)
        return flat

    def close(self) -> None:
        self.adapter.close()  # the base is its opener's to close

    def abandon_reads(self) -> None:
        self.adapter.abandon_reads()
        self.base.abandon_reads()


def _work_dtype(base: torch.dtype) -> torch.dtype:
    """Where W + ΔW is summed: fp32, or fp64 for an fp64 base weight (fp32 would round W itself)."""
    return torch.float64 if base == torch.float64 else torch.float32


def _parse(adapter: Adapter) -> tuple[list[Module], dict[str, str]]:
    """The adapted modules and the full tensors (base name -> stored name) of an adapter; InputError when its
    tensors contradict its config or the LoRA layout."""
    cfg, spec = adapter.config, adapter.spec
    parts: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    for stored in adapter.infos:
        key = _module_key(stored)
        hit = _FACTOR.match(key)
        if hit is None:
            if "lora_" in key or "trainable_tokens" in key:
                raise InputError(
                    f"adapter {spec}: tensor {stored!r} is no part of the LoRA layout ckptdiff merges (lora_A/lora_B "
                    "weights, lora_B.bias, lora_embedding_A/B, lora_magnitude_vector); re-save the adapter with peft"
                )
            full[key] = stored
            continue
        role = hit["mag"] or hit["emb"] or hit["part"] or hit["bias"]
        parts.setdefault(hit["path"], {})[role] = stored
    modules: list[Module] = []
    for path, got in sorted(parts.items(), key=lambda kv: natural_key(kv[0])):  # the first module named first
        embedding = "lora_embedding_A" in got or "lora_embedding_B" in got
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_key not in got or b_key not in got:
            have = ", ".join(sorted(got))
            raise InputError(
                f"adapter {spec}: module {path} has {have} but not both {a_key} and {b_key}; the adapter is "
                "incomplete: re-download or re-save it"
            )
        a, b = adapter.infos[got[a_key]], adapter.infos[got[b_key]]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise InputError(
                f"adapter {spec}: module {path} has {len(a.shape)}-D factors (a convolution?); ckptdiff merges "
                "LoRA on linear and embedding layers only: merge it with peft's merge_and_unload"
            )
        if not (a.dtype.is_float and b.dtype.is_float):
            raise InputError(f"adapter {spec}: module {path} has non-float factors; re-save the adapter with peft")
        r, alpha = cfg.rank_alpha(path)
        if a.shape[0] != r or b.shape[1] != r:
            raise InputError(
                f"adapter {spec}: {cfg.where} gives module {path} rank {r}, but its factors are "
                f"{list(a.shape)} and {list(b.shape)} (rank {a.shape[0]} and {b.shape[1]}); the config contradicts "
                "the tensors: use the config saved with these weights"
            )
        magnitude = got.get("lora_magnitude_vector")
        if cfg.dora and magnitude is None:
            raise InputError(
                f"adapter {spec}: {cfg.where} says use_dora, but module {path} has no lora_magnitude_vector; the "
                "config contradicts the tensors: use the config saved with these weights"
            )
        if magnitude is not None and not cfg.dora:
            raise InputError(
                f"adapter {spec}: module {path} has a lora_magnitude_vector (DoRA), but {cfg.where} does not say "
                "use_dora; the config contradicts the tensors: use the config saved with these weights"
            )
        modules.append(
            Module(path, embedding, got[a_key], got[b_key], magnitude, got.get("bias"), r, alpha, cfg.scaling(r, alpha))
        )
    if not modules:
        raise InputError(
            f"adapter {spec} holds no lora_A/lora_B pairs ({len(adapter.infos)} tensors); it adapts nothing: "
            "check that this is the adapter you meant"
        )
    return modules, full


def merge(adapter: Adapter, base: Source | None, merged_dtype: torch.dtype | None = None) -> MergedSource:
    """``adapter`` merged into ``base`` (the base as the analyses see it), its merged weights stored as
    ``merged_dtype`` (bf16, fp16 or fp32, as ``--merged-dtype``; None: the base's); InputError without a base."""
    if base is None:
        raise InputError(
            f"{adapter.spec} is a PEFT adapter (adapter_config.json), a fine-tune only beside its base: pass the "
            f"base model as BASE and the adapter after it ({adapter.config.base_named})"
        )
    if isinstance(base, (Adapter, MergedSource)):
        raise InputError(
            f"the base {base.spec} is itself a PEFT adapter; pass the model it adapts as the base, the adapter after it"
        )
    return MergedSource(adapter, base, choices.merged_dtype(merged_dtype))
