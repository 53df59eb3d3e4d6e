"""The profile of a model in sparsity mode: one search dimension per prunable weight tensor.

A :class:`SparsityProfile` is a :class:`~autoprune.profile.ModelProfile` whose "groups" are the
weight tensors of the convolutions and linear layers (the group's name is the layer's module name,
its ``channels`` the tensor's number of weights, its unit one weight), so that budgets, projection,
plans, strategies and tracking work on it unchanged. Every cost it answers is *linear* in the
weights kept per tensor: the nonzero weights, the nonzero parameters, the multiply-accumulates
that touch a nonzero weight, and the bytes of the compressed model file. That is what makes the
projection onto a ``nonzeros=`` or ``size=`` budget exact by construction, as it is for channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from .. import pruning
from ..errors import ConfigError, UnsupportedModelError
from ..profile import _FACTORS, CostModel, GroupInfo, ModelProfile, fingerprint_of, profile_model

if TYPE_CHECKING:
    from ..task import Task

__all__ = ["PATTERNS", "MODES", "SparsityProfile", "profile_weights", "profile_for", "mask_bytes"]

#: How the zeros of a weight tensor may be placed: anywhere (``unstructured``), or two of every
#: four consecutive weights along the input dimension (``2:4``, what sparse tensor cores run).
PATTERNS = ("unstructured", "2:4")
MODES = ("channels", "sparsity")
#: Layer types whose weight is a search dimension: their weights multiply inputs, so a zero is a
#: multiply-accumulate skipped by a sparse kernel and a value not stored by a compressed file.
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def mask_bytes(numel: int) -> int:
    """Bytes of a weight tensor's bitmask in the compressed format: one bit per weight."""
    return math.ceil(numel / 8)


@dataclass(frozen=True)
class SparsityProfile(ModelProfile):
    """A model profiled for weight sparsity (``mode: sparsity``).

    ``groups`` are weight tensors: ``name`` is the layer's module name, ``channels`` its number of
    weights, ``kind`` is ``weights`` and ``unit`` the fewest weights a plan may zero at once (1, or
    half the tensor under the 2:4 pattern, where a layer is dense or 2:4). ``macs`` and ``params``
    are the dense model's; the cost model gives the MACs that touch a nonzero weight and the
    nonzero parameters.

    Attributes:
        pattern: ``unstructured`` or ``2:4``.
        parameters: the state-dict key of each group's weight, in group order.
        value_bytes: bytes stored per weight kept, per group (its element size, times the number
            of state-dict keys that share the tensor).
        size_base: bytes of the compressed model that do not depend on the plan: every weight's
            bitmask and every other tensor of the state dict (biases, BatchNorm), stored dense.
        dense_bytes: bytes of the dense model's state dict (every tensor stored dense).
        row_lengths: weights per output row of each group's tensor (input channels per group of a
            convolution times its kernel area): the axis the 2:4 pattern groups along.
    """

    mode: ClassVar[str] = "sparsity"
    pattern: str = "unstructured"
    parameters: tuple[str, ...] = ()
    value_bytes: tuple[float, ...] = ()
    size_base: float = 0.0
    dense_bytes: float = 0.0
    row_lengths: tuple[int, ...] = ()

    @property
    def nonzeros(self) -> float:
        """Weights of the dense model's prunable tensors (what ``nonzeros=`` fractions are of)."""
        return float(sum(g.channels for g in self.groups))

    def nonzeros_of(self, kept: Mapping[str, int]) -> float:
        """Nonzero weights of the prunable tensors with ``kept[name]`` weights per tensor."""
        return float(sum(kept.get(g.name, g.channels) for g in self.groups))

    def size_of(self, kept: Mapping[str, int]) -> float:
        """Bytes of the compressed model's tensors with ``kept[name]`` weights per tensor."""
        return self.size_base + float(sum(b * kept.get(g.name, g.channels) for g, b in zip(self.groups, self.value_bytes)))

    def size_of_vector(self, kept: np.ndarray) -> float:
        """:meth:`size_of` for kept counts in group order (the projection's hot path)."""
        return self.size_base + float(np.dot(self.value_bytes, kept))

    def row_length(self, name: str) -> int:
        """Weights per output row of tensor ``name`` (the 2:4 pattern's axis)."""
        return self.row_lengths[self.names.index(name)]

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "mode": self.mode, "pattern": self.pattern, "nonzeros": self.nonzeros,
                "size_base": self.size_base, "dense_bytes": self.dense_bytes}


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _positions(model: nn.Module, example_input: torch.Tensor, layers: Mapping[str, nn.Module]) -> dict[str, int]:
    """How many times each layer's weight multiplies an input in one forward pass of batch 1:
    the output positions (spatial positions of a convolution, leading positions of a linear layer),
    summed over calls. A weight's MACs are this times the weights kept."""
    found = {name: 0 for name in layers}
    handles = []
    for name, module in layers.items():
        def hook(m: nn.Module, inputs: tuple[Any, ...], output: Any, name: str = name) -> None:
            if isinstance(output, torch.Tensor):
                per_channel = output.shape[-1] if isinstance(m, nn.Linear) else output.shape[1]
                found[name] += output.numel() // max(1, int(per_channel))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return found


def _row_length(weight: torch.Tensor) -> int:
    """Weights per output row (input channels times kernel area): the 2:4 pattern's axis."""
    return weight.numel() // weight.shape[0]


def profile_weights(
    task: Task | nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    pattern: str = "unstructured",
    ignored_layers: Sequence[str] = (),
) -> SparsityProfile:
    """Profile a task's dense model (or a model and its ``example_input`` of batch 1) for sparsity.

    One dimension per weight of a convolution or linear layer that runs in the forward pass,
    the classifier included (exclude it with ``groups.exclude``). Layers in the task's
    ``ignored_layers`` stay dense. Under the ``2:4`` pattern a layer whose rows (input channels
    times kernel area) are not a multiple of 4 cannot hold the pattern and stays dense too; both
    are listed in ``left_whole`` with the reason.
    """
    from ..task import Task

    if pattern not in PATTERNS:
        raise ConfigError(f"Unknown sparsity pattern {pattern!r}; allowed: {', '.join(PATTERNS)}.")
    name: str | None = None
    if isinstance(task, Task):
        model, example_input = task.model, task.example_input
        ignored_layers = tuple(task.ignored_layers) + tuple(ignored_layers)
        name = task.name
    else:
        model = task
        if example_input is None:
            raise ConfigError("profile_weights(model) needs example_input, one input batch of size 1.")
    if example_input.shape[0] != 1:
        raise ConfigError(f"example_input must have batch size 1, got shape {tuple(example_input.shape)}.")
    model.eval()
    modules = dict(model.named_modules())
    unknown = sorted(set(ignored_layers) - set(modules))
    if unknown:
        raise ConfigError(f"ignored_layers name no layer of the model: {', '.join(unknown)}.")
    left_whole: dict[str, str] = {}
    layers: dict[str, nn.Module] = {}
    seen: dict[int, str] = {}
    for module_name, module in modules.items():
        if not isinstance(module, _WEIGHTED) or not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        if id(module.weight) in seen:
            continue  # a tied weight: its first layer is its dimension, the others alias it
        seen[id(module.weight)] = module_name
        if module_name in ignored_layers:
            left_whole[module_name] = f"{module_name}: in the task's ignored_layers"
        elif pattern == "2:4" and _row_length(module.weight) % 4:
            left_whole[module_name] = (f"{module_name} ({type(module).__name__}): its rows hold "
                                       f"{_row_length(module.weight)} weights, not a multiple of 4, so 2:4 cannot apply")
        else:
            layers[module_name] = module
    positions = _positions(model, example_input, layers)
    for module_name, count in positions.items():
        if count == 0:
            left_whole[module_name] = f"{module_name}: not called in the forward pass"
            del layers[module_name]
    if not layers:
        raise UnsupportedModelError(
            f"This {type(model).__name__} has no convolution or linear weight to sparsify"
            + (f" ({'; '.join(left_whole.values())})" if left_whole else "") + "."
        )
    dense_macs, _ = pruning.count_macs_params(model, example_input)
    state = model.state_dict(keep_vars=True)
    # Every state-dict key a prunable weight appears under (tied weights appear under several).
    keys_of: dict[str, list[str]] = {n: [] for n in layers}
    by_id = {id(m.weight): n for n, m in layers.items()}
    for key, tensor in state.items():
        owner = by_id.get(id(tensor))
        if owner is not None:
            keys_of[owner].append(key)
    dense_params = float(sum(p.numel() for p in model.parameters()))
    groups, terms, value_bytes = [], [], []
    for module_name, module in layers.items():
        w = module.weight
        macs = float(w.numel() * positions[module_name])
        stride = getattr(module, "stride", (1,))
        kernel = getattr(module, "kernel_size", (1,))
        out_shape = _output_shape(positions[module_name], module)
        groups.append(GroupInfo(
            name=module_name, channels=w.numel(), members=tuple(f"{k}:weight" for k in keys_of[module_name]),
            macs=macs, macs_share=macs / dense_macs if dense_macs else 0.0,
            in_channels=int(getattr(module, "in_channels", getattr(module, "in_features", 0))),
            kernel_size=int(np.prod(kernel)), stride=int(stride[0]), height=out_shape[0], width=out_shape[1],
            kind="weights", unit=w.numel() // 2 if pattern == "2:4" else 1,
        ))
        terms.append(float(positions[module_name]))
        value_bytes.append(float(w.element_size() * len(keys_of[module_name])))
    sparse_keys = {k for ks in keys_of.values() for k in ks}
    dense_bytes = float(sum(_tensor_bytes(t) for t in state.values()))
    size_base = float(sum(mask_bytes(t.numel()) if k in sparse_keys else _tensor_bytes(t) for k, t in state.items()))
    cost = _linear_cost(groups, terms, dense_macs=float(dense_macs), dense_params=dense_params)
    return SparsityProfile(
        task=name, input_shape=tuple(int(d) for d in example_input.shape), groups=tuple(groups),
        macs=float(dense_macs), params=dense_params, fingerprint=fingerprint_of([(g.name, g.channels) for g in groups]),
        ignored_layers=tuple(sorted(set(ignored_layers))), cost=cost, left_whole=tuple(left_whole.items()),
        pattern=pattern, parameters=tuple(keys_of[g.name][0] for g in groups), value_bytes=tuple(value_bytes),
        size_base=size_base, dense_bytes=dense_bytes, row_lengths=tuple(_row_length(layers[g.name].weight) for g in groups),
    )


def _output_shape(positions: int, module: nn.Module) -> tuple[int, int]:
    """(height, width) of a layer's output for AMC's embedding: square for 2-d convolutions."""
    if isinstance(module, nn.Conv2d):
        side = int(round(math.sqrt(positions)))
        return (side, side) if side * side == positions else (positions, 1)
    return (positions, 1) if isinstance(module, (nn.Conv1d, nn.Conv3d)) else (1, 1)


def _linear_cost(groups: Sequence[GroupInfo], positions: Sequence[float], *, dense_macs: float,
                 dense_params: float) -> CostModel:
    """The profile's cost model with quantities [1, kept weights per tensor..., other parameters]:
    MACs are ``sum(positions * kept)`` plus what no prunable weight touches (biases, BatchNorm,
    activations: constant), parameters ``sum(kept)`` plus the rest."""
    g = len(groups)
    dense = np.array([grp.channels for grp in groups], dtype=np.float64)
    base = np.concatenate([[1.0], dense, [dense_params - dense.sum()]])
    slopes = np.zeros((g + 2, g))
    slopes[1 + np.arange(g), np.arange(g)] = 1.0

    def row(index: int) -> list[int]:
        return [index] + [0] * (_FACTORS - 1)

    coef = np.array(positions, dtype=np.float64)
    return CostModel(
        base=base, slopes=slopes, mac_coef=coef,
        mac_num=np.array([row(1 + i) for i in range(g)], dtype=np.int64).reshape(-1, _FACTORS),
        mac_den=np.zeros(g, dtype=np.int64), mac_owner=np.arange(g, dtype=np.int64),
        mac_residual=float(dense_macs - float(coef @ dense)),
        param_num=np.array([row(1 + i) for i in range(g + 1)], dtype=np.int64).reshape(-1, _FACTORS),
        keys=(("one",), *(("weights", grp.name) for grp in groups), ("other_params",)),
    )


def profile_for(task: Task | nn.Module, example_input: torch.Tensor | None = None, *, mode: str = "channels",
                pattern: str = "unstructured") -> ModelProfile:
    """The profile a search of ``mode`` works on: channel groups, or weight tensors (of a task, or
    of a model and its example input)."""
    if mode == "sparsity":
        return profile_weights(task, example_input, pattern=pattern)
    if mode != "channels":
        raise ConfigError(f"Unknown mode {mode!r}; allowed: {', '.join(MODES)}.")
    return profile_model(task, example_input)
