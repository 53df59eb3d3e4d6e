"""Saving and loading physically pruned models without unpickling arbitrary objects.

A pruned model file holds the plan (JSON text) and the pruned state dict, nothing else, so it
loads with ``torch.load(weights_only=True)``. The architecture is rebuilt by applying the plan's
channel counts to the task's dense architecture, then the saved weights are loaded into it.
A sparsity plan's model is written compressed instead (bitmask + nonzero values per weight tensor,
:mod:`autoprune.sparsity`); :func:`load_pruned` reads both.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, PlanError, short
from .plan import Plan, StaleBatchNormWarning, apply_plan

__all__ = ["PRUNED_FORMAT", "save_pruned", "load_pruned"]

PRUNED_FORMAT = "autoprune.pruned/1"


def save_pruned(model: nn.Module, plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write ``{"format", "plan", "state_dict"}`` atomically to ``path`` (a sparsity plan's model:
    the compressed ``autoprune.sparse/1`` file, see :func:`autoprune.sparsity.save_sparse`)."""
    if plan.mode == "sparsity":
        from .sparsity import save_sparse

        return save_sparse(model, plan, path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": PRUNED_FORMAT,
        "plan": plan.to_json(indent=None),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_pruned(
    path: str | os.PathLike[str], dense_model: nn.Module, *, ignored_layers: tuple[str, ...] = ()
) -> tuple[nn.Module, Plan]:
    """Rebuild a pruned model saved by :func:`save_pruned` on top of its dense architecture.

    ``dense_model`` supplies the architecture only (its weights are replaced); it is not modified.
    A compressed sparse model file loads into a copy of the same shapes, bit for bit.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"Pruned model file {path} does not exist.") from None
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a pruned model saved by autoprune ({type(exc).__name__}); it must load "
            "with torch.load(weights_only=True)."
        ) from None
    from .sparsity import SPARSE_FORMAT
    from .sparsity._format import model_from_payload

    if isinstance(payload, dict) and payload.get("format") == SPARSE_FORMAT:
        return model_from_payload(payload, path, dense_model, ignored_layers=ignored_layers)
    if (not isinstance(payload, dict) or payload.get("format") != PRUNED_FORMAT
            or not isinstance(payload.get("plan"), str) or not isinstance(payload.get("state_dict"), dict)):
        raise CheckpointError(f"{path} is not a pruned model of format {PRUNED_FORMAT!r} (a plan as JSON text "
                              "and a state dict).")
    plan = Plan.from_json(payload["plan"], source=f"the plan inside {path}")
    # The same checks as apply_plan: the plan must fit the dense architecture field by field.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StaleBatchNormWarning)  # the saved statistics replace them below
        model = apply_plan(dense_model, plan, ignored_layers=ignored_layers, importance="random")
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise PlanError(f"{path}: saved weights do not fit the plan's architecture ({short(exc)}).") from None
    return model.eval(), plan
