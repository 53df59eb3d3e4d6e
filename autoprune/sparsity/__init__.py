"""Weight sparsity (``mode: sparsity``): the secondary mode, in which weights, not channels, go.

A search dimension is one prunable weight tensor (convolutions and linear layers), its ratio the
fraction of its weights set to zero, chosen by magnitude within the tensor (or another criterion),
unstructured or in the 2:4 pattern. The mode reuses the channel mode's machinery: the profile
(:mod:`._profile`) is a :class:`~autoprune.profile.ModelProfile` whose costs are linear in the
weights kept, so budgets (``nonzeros=``, ``size=``) and projection work unchanged; a candidate is a
masked copy of the dense model (:mod:`._mask`); the baselines are uniform, global magnitude and
LAMP (:mod:`._plans`); export fine-tunes with the zeros held, at once, iteratively or gradually
(:mod:`._finetune`), and writes a bitmask + values file (:mod:`._format`) and a report of bytes,
sparsity and latency (:mod:`._export`, :mod:`._report`).
"""

from ._export import export_sparse
from ._finetune import sparsify_and_finetune
from ._format import (
    SPARSE_FORMAT,
    compress_state,
    decompress_state,
    load_sparse,
    payload_bytes,
    save_sparse,
    sparse_payload,
)
from ._mask import (
    WEIGHT_CRITERIA,
    WeightMasker,
    apply_masks,
    hold_masks,
    lamp_scores,
    masks_at,
    measured_sparsity,
    weight_scores,
)
from ._plans import global_magnitude_plan, lamp_plan, ranked_plan
from ._profile import MODES, PATTERNS, SparsityProfile, mask_bytes, profile_for, profile_weights
from ._report import SparseExportReport, sparse_report_markdown

__all__ = [
    "MODES",
    "PATTERNS",
    "SPARSE_FORMAT",
    "WEIGHT_CRITERIA",
    "SparseExportReport",
    "SparsityProfile",
    "WeightMasker",
    "apply_masks",
    "compress_state",
    "decompress_state",
    "export_sparse",
    "global_magnitude_plan",
    "hold_masks",
    "lamp_plan",
    "lamp_scores",
    "load_sparse",
    "mask_bytes",
    "masks_at",
    "measured_sparsity",
    "payload_bytes",
    "profile_for",
    "profile_weights",
    "ranked_plan",
    "save_sparse",
    "sparse_payload",
    "sparse_report_markdown",
    "sparsify_and_finetune",
    "weight_scores",
]
