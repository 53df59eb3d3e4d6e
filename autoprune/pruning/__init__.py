"""Channel surgery: dependency groups, importance criteria and physical pruning.

This package is the only importer of Torch-Pruning. It finds the groups of layers whose channels
must be removed together (residual adds, concats, grouped and depthwise convolutions, attention
heads couple them; ``_graph``), ranks the channels of each group by an importance criterion
(``importance``), removes the lowest-ranked ones from a *copy* of a model, and counts MACs and
parameters the way Torch-Pruning does (``_counting``).
"""

from ._counting import CallRecord, count_macs_params, trace_calls
from ._graph import (
    RawGroup,
    Surgeon,
    _block_indices,
    classifier_name,
    find_groups,
    prune_copy,
    shape_copy,
)
from ._exactness import EXACT_TOLERANCE, inexact_groups, pruning_error
from ._trace import TRACE_LIMITS
from .importance import (
    IMPORTANCE_NAMES,
    BNScaleImportance,
    ChannelImportance,
    L1Importance,
    L2Importance,
    RandomImportance,
    TaylorImportance,
    channel_scores,
    make_importance,
)

__all__ = [
    "ChannelImportance",
    "L1Importance",
    "L2Importance",
    "TaylorImportance",
    "BNScaleImportance",
    "RandomImportance",
    "IMPORTANCE_NAMES",
    "make_importance",
    "RawGroup",
    "TRACE_LIMITS",
    "find_groups",
    "classifier_name",
    "channel_scores",
    "prune_copy",
    "Surgeon",
    "count_macs_params",
    "shape_copy",
    "CallRecord",
    "trace_calls",
    "_block_indices",
    "EXACT_TOLERANCE",
    "inexact_groups",
    "pruning_error",
]
