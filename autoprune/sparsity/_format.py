"""The compressed model file of a sparsity plan: a bitmask and the nonzero values per weight tensor.

``model.pt`` holds ``{"format": "autoprune.sparse/1", "plan": <JSON text>, "dense": {key: tensor},
"sparse": {key: {"shape": [..], "mask": uint8 tensor, "values": tensor}}}``: every sparsified
weight as one bit per weight (packed, little-endian bit order as numpy's ``packbits``) and its
nonzero values in row-major order, every other tensor of the state dict as it is. It loads with
``torch.load(weights_only=True)`` and rebuilds the model bit for bit. A bitmask costs 1/32 of a
float32 tensor, so it is smaller than any index list (CSR's int32 column indices cost a full
word per nonzero) at every sparsity below 97%; its size is linear in the nonzeros, which is what
lets ``size=`` budgets be met exactly (:class:`SparsityProfile.size_of`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, PlanError, short
from ..plan import Plan, check_plan_matches
from ._profile import SparsityProfile, profile_weights

__all__ = ["SPARSE_FORMAT", "compress_state", "decompress_state", "payload_bytes", "sparse_payload", "save_sparse",
           "load_sparse", "model_from_payload"]

SPARSE_FORMAT = "autoprune.sparse/1"


def compress_state(state: dict[str, torch.Tensor], sparse_keys: set[str]) -> dict[str, Any]:
    """``{"dense": ..., "sparse": ...}`` of a state dict, the ``sparse_keys`` stored as bitmask + values.

    The mask records the weights that are nonzero as saved (a kept weight that trained to exactly
    0 is stored as a zero, which loads back the same)."""
    dense, sparse = {}, {}
    for key, tensor in state.items():
        t = tensor.detach().cpu()
        if key in sparse_keys:
            flat = t.reshape(-1)
            keep = (flat != 0).numpy()
            sparse[key] = {"shape": list(t.shape), "mask": torch.from_numpy(np.packbits(keep)),
                           "values": flat[torch.from_numpy(keep)].clone()}
        else:
            dense[key] = t.clone()
    return {"dense": dense, "sparse": sparse}


def decompress_state(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict :func:`compress_state` stored, every tensor as it was."""
    state = dict(payload["dense"])
    for key, entry in payload["sparse"].items():
        shape = [int(d) for d in entry["shape"]]
        numel = int(np.prod(shape)) if shape else 1
        keep = torch.from_numpy(np.unpackbits(entry["mask"].numpy(), count=numel).astype(bool))
        values = entry["values"]
        if int(keep.sum()) != values.numel():
            raise CheckpointError(f"tensor {key!r}: its mask marks {int(keep.sum())} nonzeros but {values.numel()} "
                                  "values are stored; the file is corrupted.")
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[keep] = values
        state[key] = flat.reshape(shape)
    return state


def payload_bytes(compressed: dict[str, Any]) -> int:
    """Bytes of the tensors a compressed state holds (masks, values, dense tensors): what the
    profile's size model predicts; the file adds its container's headers (a few hundred bytes
    per tensor)."""
    total = sum(t.numel() * t.element_size() for t in compressed["dense"].values())
    for entry in compressed["sparse"].values():
        total += entry["mask"].numel() + entry["values"].numel() * entry["values"].element_size()
    return int(total)


def _sparse_keys(profile: SparsityProfile) -> set[str]:
    return {member.rsplit(":", 1)[0] for g in profile.groups for member in g.members}


def sparse_payload(model: nn.Module, plan: Plan, *, profile: SparsityProfile | None = None) -> dict[str, Any]:
    """What :func:`save_sparse` writes: the format, the plan, and the compressed state."""
    if profile is None:
        profile = profile_weights(model, torch.zeros(plan.input_shape), pattern=plan.pattern or "unstructured")
    check_plan_matches(plan, [(g.name, g.channels) for g in profile.groups], what="the model to save")
    return {"format": SPARSE_FORMAT, "plan": plan.to_json(indent=None),
            **compress_state(model.state_dict(), _sparse_keys(profile))}


def save_sparse(model: nn.Module, plan: Plan, path: str | os.PathLike[str], *,
                profile: SparsityProfile | None = None) -> Path:
    """Write ``model`` (a sparsity plan's masked model) compressed, atomically, to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = sparse_payload(model, plan, profile=profile)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_sparse(payload: Any, path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Plan]:
    """The state dict and plan of a loaded sparse payload, checked."""
    if (not isinstance(payload, dict) or payload.get("format") != SPARSE_FORMAT or not isinstance(payload.get("plan"), str)
            or not isinstance(payload.get("dense"), dict) or not isinstance(payload.get("sparse"), dict)):
        raise CheckpointError(f"{path} is not a compressed sparse model of format {SPARSE_FORMAT!r} (a plan as JSON "
                              "text, dense tensors and bitmask + values per sparse weight).")
    plan = Plan.from_json(payload["plan"], source=f"the plan inside {path}")
    try:
        state = decompress_state(payload)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: a compressed tensor cannot be read ({short(exc)}).") from None
    return state, plan


def load_sparse(path: str | os.PathLike[str], dense_model: nn.Module, *,
                ignored_layers: tuple[str, ...] = ()) -> tuple[nn.Module, Plan]:
    """Rebuild a model saved by :func:`save_sparse` on a copy of its dense architecture.

    ``dense_model`` supplies the architecture (its weights are replaced; it is not modified); the
    plan must fit its weight tensors."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"Sparse model file {path} does not exist.") from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not a model saved by autoprune ({type(exc).__name__}); it must load with "
                              "torch.load(weights_only=True).") from None
    return model_from_payload(payload, path, dense_model, ignored_layers=ignored_layers)


def model_from_payload(payload: Any, path: str | os.PathLike[str], dense_model: nn.Module, *,
                       ignored_layers: tuple[str, ...] = ()) -> tuple[nn.Module, Plan]:
    """The model a loaded sparse payload holds, on a copy of ``dense_model``'s architecture
    (``ignored_layers``: the task's, which its search left dense)."""
    state, plan = read_sparse(payload, path)
    profile = profile_weights(dense_model, torch.zeros(plan.input_shape), pattern=plan.pattern or "unstructured",
                              ignored_layers=ignored_layers)
    check_plan_matches(plan, [(g.name, g.channels) for g in profile.groups], what="the dense model given")
    model = copy.deepcopy(dense_model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise PlanError(f"{path}: saved weights do not fit the dense architecture ({short(exc)}).") from None
    return model.eval(), plan
