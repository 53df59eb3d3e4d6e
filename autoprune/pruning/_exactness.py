"""Whether a group's pruning is exact: removing its channels changes nothing but those channels.

Torch-Pruning follows channels through the operations it knows (adds, concatenations, splits,
flattens, the reshapes of attention). An operation that moves channels in a way it does not know
(``torch.roll`` or ``flip`` along channels, a hand-written shuffle) is passed through as if it kept
every channel in place: the pruned copy runs, has the counted MACs, and is silently not the model
with those channels removed, since the layers after such an operation lose the wrong inputs.
Removing channels that carry zeros changes no output, so comparing the pruned copy with the dense
model whose removed channels are zeroed (:meth:`Surgeon.zeroed_copy`) tells the two apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ._graph import Surgeon

#: Largest output difference, relative to the output's largest magnitude, of an exact pruning:
#: float32 summation order, nothing more (measured below 1e-5 on every supported zoo model).
EXACT_TOLERANCE = 1e-3


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    items = out if isinstance(out, (tuple, list)) else (out.values() if isinstance(out, dict) else (out,))
    return [t.float() for t in items if isinstance(t, torch.Tensor)]


def pruning_error(surgeon: Surgeon, kept: Mapping[str, int], x: torch.Tensor,
                  scores: Mapping[str, np.ndarray] | None = None) -> float:
    """Largest difference between the outputs of ``surgeon.prune(kept, scores)`` and of the dense
    model with the same channels zeroed, relative to the largest output magnitude, on input ``x``."""
    pruned, zeroed = _outputs(surgeon.prune(kept, scores), x), _outputs(surgeon.zeroed_copy(kept, scores), x)
    if len(pruned) != len(zeroed) or any(a.shape != b.shape for a, b in zip(pruned, zeroed)):
        return float("inf")
    scale = max((float(b.abs().max()) for b in zeroed if b.numel()), default=0.0)
    diff = max((float((a - b).abs().max()) for a, b in zip(pruned, zeroed) if a.numel()), default=0.0)
    return diff / scale if scale > 0 else 0.0


def inexact_groups(surgeon: Surgeon, minimum: Mapping[str, int], example_input: torch.Tensor) -> dict[str, float]:
    """The groups of ``minimum`` (group -> a kept count below its channels) whose pruning is not
    exact, with their relative error: all are checked at once on a random input, and one by one
    only when that fails. Groups feeding a cross-channel normalization (where zeroing is not
    removing) are not checked."""
    checkable = {name: keep for name, keep in minimum.items() if surgeon.zeroable(name)}
    if not checkable or not example_input.is_floating_point():
        return {}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, *example_input.shape[1:]), generator=generator, dtype=example_input.dtype)
    if pruning_error(surgeon, checkable, x) <= EXACT_TOLERANCE:
        return {}
    errors = {name: pruning_error(surgeon, {name: keep}, x) for name, keep in checkable.items()}
    return {name: error for name, error in errors.items() if error > EXACT_TOLERANCE}
