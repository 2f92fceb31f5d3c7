"""`ckptdiff patch`: the update as an artifact. A sparse patch rebuilds the fine-tune bit for bit from its base.

``patch create`` is a plug-in on the one pass (:class:`PatchAnalysis`, flat chunks of the stored tensors, so Hub
inputs, ``--hub-stream`` and torchrun ranks work as for every analysis). Each rank writes the changed entries of
its tensors to two scratch files beside the output (values; indices or bitmasks); rank 0 merges the records,
writes the patch (one safetensors file, or a folder of shards and their index; layout in docs/patches.md) from the
scratch files, and every scratch file is removed. ``patch size`` is the same pass without writing. ``patch apply``
and ``patch verify`` stream tensor by tensor: each tensor is rebuilt, its sha256 checked against the patch, then
written (or compared).

The patch's layout (format version 1) is :data:`FORMAT_VERSION`; the names of its tensors are ``NAME:indices``,
``NAME:mask``, ``NAME:values`` and ``NAME:dense`` for the fine-tune tensor ``NAME``, as the metadata lists them.
"""

from ckptdiff.analyses.patch.apply import (
    ApplyResult,
    FtTensor,
    PatchFile,
    Rebuilder,
    VerifyResult,
    check_base,
    check_chain,
    patch_apply,
    patch_verify,
)
from ckptdiff.analyses.patch.common import (
    BASE_KEY,
    FORMAT,
    FORMAT_VERSION,
    FT_KEY,
    PATCH_INDEX,
    ft_layout,
    hub_commit,
    sha256_hex,
)
from ckptdiff.analyses.patch.create import (
    COLUMNS,
    PatchAnalysis,
    PatchResult,
    Piece,
    TensorPatch,
    patch_create,
    patch_size,
)

__all__ = [
    "BASE_KEY",
    "COLUMNS",
    "FORMAT",
    "FORMAT_VERSION",
    "FT_KEY",
    "PATCH_INDEX",
    "ApplyResult",
    "FtTensor",
    "PatchAnalysis",
    "PatchFile",
    "PatchResult",
    "Piece",
    "Rebuilder",
    "TensorPatch",
    "VerifyResult",
    "check_base",
    "check_chain",
    "ft_layout",
    "hub_commit",
    "patch_apply",
    "patch_create",
    "patch_size",
    "patch_verify",
    "sha256_hex",
]
