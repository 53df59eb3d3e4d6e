"""Profile of a dense model: its prunable groups, MACs, parameters and an analytic cost model.

The cost model answers "how many MACs and parameters would the model have with these channel
counts?" in microseconds, without pruning or tracing, so that budget projection can try hundreds of
channel vectors per candidate. It is exact for the layers Torch-Pruning's counter counts: every
size a layer's count uses (input/output dims, in/out channels, groups) is linear in the number of
channels removed from each group, so one pruned trace per group measures those slopes once.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from . import pruning
from ._cost_terms import _FACTORS, Quantities, call_terms, dims, pad, size_vector
from .errors import AutopruneError, ConfigError, UnsupportedModelError, short

if TYPE_CHECKING:
    from .task import Task

__all__ = ["GroupInfo", "ModelProfile", "CostModel", "profile_model"]


@dataclass(frozen=True)
class GroupInfo:
    """One prunable group (one search dimension).

    Attributes:
        name: the root layer's module name; plans and search spaces key ratios by it.
        channels: dense number of output channels shared by the group.
        members: ``"module:out"``/``"module:in"`` for every named layer the group prunes.
        macs: dense MACs of the layers whose output channels this group owns.
        macs_share: ``macs`` as a fraction of the whole model's MACs.
        in_channels, kernel_size, stride, height, width: the root layer's shape (AMC's embedding);
            height and width are the root's output feature map (1 for linear layers).
        divisor: the group's channels come in this many equal blocks (grouped convolutions,
            GroupNorm; q, k and v of a head group) and are removed evenly from each.
        kind: ``channels`` (whole channels go) or ``heads`` (whole attention heads go).
        unit: channels per prunable unit in a block: 1, or the head dimension of a head group.
            Every kept count is a multiple of ``divisor * unit``.
        embedding: the residual stream of a transformer: searched only when a search space names
            it (its default ratio range is [0, 0]).
    """

    name: str
    channels: int
    members: tuple[str, ...]
    macs: float
    macs_share: float
    in_channels: int
    kernel_size: int
    stride: int
    height: int
    width: int
    divisor: int = 1
    kind: str = "channels"
    unit: int = 1
    embedding: bool = False

    @property
    def step(self) -> int:
        """The fewest channels the group can lose (one unit from every block)."""
        return self.divisor * self.unit

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "channels": self.channels, "members": list(self.members),
            "macs": self.macs, "macs_share": self.macs_share, "in_channels": self.in_channels,
            "kernel_size": self.kernel_size, "stride": self.stride,
            "height": self.height, "width": self.width, "divisor": self.divisor, "kind": self.kind,
            "unit": self.unit, "embedding": self.embedding,
        }




@dataclass(frozen=True, eq=False)
class CostModel:
    """MACs and parameters as exact functions of the channels removed per group.

    Quantities ``q = base - slopes @ removed`` (shape (Q,)); every counted layer call contributes
    terms ``coef * prod(q[num]) / q[den]``. ``removed`` has shape (G,), channels removed per group
    in profile order.
    """

    base: np.ndarray  # (Q,)
    slopes: np.ndarray  # (Q, G)
    mac_coef: np.ndarray  # (T,)
    mac_num: np.ndarray  # (T, _FACTORS) int
    mac_den: np.ndarray  # (T,) int
    mac_owner: np.ndarray  # (T,) group index or -1
    mac_residual: float  # counted MACs of layer kinds the model does not scale (kept constant)
    param_num: np.ndarray  # (P, _FACTORS) int
    keys: tuple[tuple[Any, ...], ...] = ()  # what each quantity is: ("call", i, "in.1"), ("param", name, dim)

    def quantities(self, removed: np.ndarray) -> np.ndarray:
        return self.base - self.slopes @ removed

    def macs(self, removed: np.ndarray) -> float:
        q = self.quantities(removed)
        return float((self.mac_coef * q[self.mac_num].prod(axis=1) / q[self.mac_den]).sum() + self.mac_residual)

    def params(self, removed: np.ndarray) -> float:
        q = self.quantities(removed)
        return float(q[self.param_num].prod(axis=1).sum())

    def mac_terms(self, removed: np.ndarray) -> np.ndarray:
        q = self.quantities(removed)
        return self.mac_coef * q[self.mac_num].prod(axis=1) / q[self.mac_den]


@dataclass(frozen=True)
class ModelProfile:
    """What a search needs to know about a dense model, computed once.

    ``macs`` are multiply-accumulates for one input of ``input_shape`` (batch 1) as Torch-Pruning
    counts them (convolutions, linear layers, BatchNorm, activations, pooling); ``params`` counts
    parameters. ``fingerprint`` identifies the group structure; plans carry it. ``mode`` says what a
    group is: channels here, weight tensors in :class:`autoprune.sparsity.SparsityProfile`.
    """

    mode: ClassVar[str] = "channels"
    task: str | None
    input_shape: tuple[int, ...]
    groups: tuple[GroupInfo, ...]
    macs: float
    params: float
    fingerprint: str
    ignored_layers: tuple[str, ...]
    cost: CostModel = field(repr=False, compare=False)
    #: (group, why) of groups Torch-Pruning found that cannot be pruned and still run: left whole
    left_whole: tuple[tuple[str, str], ...] = ()

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def group(self, name: str) -> GroupInfo:
        for g in self.groups:
            if g.name == name:
                return g
        raise ConfigError(f"The model has no prunable group {name!r}; groups: {', '.join(self.names)}.")

    def _removed(self, kept: Mapping[str, int]) -> np.ndarray:
        return np.array([g.channels - kept.get(g.name, g.channels) for g in self.groups], dtype=np.float64)

    def macs_of(self, kept: Mapping[str, int]) -> float:
        """Analytic MACs with ``kept[name]`` output channels per group (missing groups stay dense)."""
        return self.cost.macs(self._removed(kept))

    def params_of(self, kept: Mapping[str, int]) -> float:
        """Analytic parameter count with ``kept[name]`` output channels per group."""
        return self.cost.params(self._removed(kept))

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "input_shape": list(self.input_shape), "macs": self.macs,
            "params": self.params, "fingerprint": self.fingerprint,
            "ignored_layers": list(self.ignored_layers),
            "groups": [g.to_dict() for g in self.groups],
            "left_whole": [{"group": name, "reason": why} for name, why in self.left_whole],
        }


def fingerprint_of(groups: Sequence[tuple[str, int]]) -> str:
    """sha256 of the group names and dense channel counts, in profile order."""
    payload = json.dumps([[name, int(channels)] for name, channels in groups], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _why(group: pruning.RawGroup, modules: Mapping[str, nn.Module], problem: object) -> str:
    text = short(problem) if isinstance(problem, BaseException) else str(problem)
    kind = type(modules[group.name]).__name__ if group.name in modules else "layer"
    return f"{group.name} ({kind}, {group.channels} channels): {text}"


def _failing_at_minimum(surgeon: pruning.Surgeon, groups: list[pruning.RawGroup],
                        modules: Mapping[str, nn.Module], example_input: torch.Tensor) -> dict[str, str]:
    """Groups whose copy pruned to one unit no longer runs: the other extreme of any search.

    All groups are tried at once (one forward pass when, as usual, that runs), then one by one,
    then, if the rest still fail together, added one by one in network order."""
    def fails(kept: Mapping[str, int]) -> BaseException | None:
        try:
            with surgeon.pruned_in_place(kept) as probe, torch.no_grad():
                probe(example_input)
        except Exception as exc:
            return exc
        return None

    minimum = {g.name: g.step for g in groups if g.channels > g.step}
    if fails(minimum) is None:
        return {}
    failing = {}
    for g in groups:
        if g.name in minimum and (exc := fails({g.name: minimum[g.name]})) is not None:
            failing[g.name] = _why(g, modules, exc)
    if fails({n: k for n, k in minimum.items() if n not in failing}) is None:
        return failing
    # Each runs alone but some combination does not: keep groups in network order while the
    # minimum of all kept so far still runs, leave whole the ones that break it.
    together: dict[str, int] = {}
    for g in groups:
        if g.name in minimum and g.name not in failing:
            if (exc := fails({**together, g.name: minimum[g.name]})) is None:
                together[g.name] = minimum[g.name]
            else:
                failing[g.name] = _why(g, modules, f"runs at its minimum alone but not with the groups before it ({short(exc)})")
    return failing


#: A dense forward pass slower than this (seconds) is traced on a meta-device copy instead.
_META_ABOVE_SECONDS = 0.05


def _for_tracing(model: nn.Module, example_input: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The model and input to trace the profile on: everything it measures depends on shapes only.

    A meta-device copy costs no arithmetic and no memory, which pays for large models and inputs;
    but meta kernels run through Python decompositions (BatchNorm takes milliseconds a call), so a
    small model whose real forward pass is quick is traced as it is. A model whose forward pass
    reads its data, which meta tensors cannot, is traced as it is too.
    """
    import time

    with torch.no_grad():
        start = time.perf_counter()
        model(example_input)
        if time.perf_counter() - start >= _META_ABOVE_SECONDS:
            try:
                shapes, shape_input = pruning.shape_copy(model), example_input.to("meta")
                shapes(shape_input)
                return shapes, shape_input
            except Exception:
                pass
    # The profile cuts layers of what it traces (and restores them): never the caller's model.
    return copy.deepcopy(model).eval(), example_input


def profile_model(
    task: Task | nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    ignored_layers: Sequence[str] = (),
) -> ModelProfile:
    """Profile a task's dense model (or a bare model with its ``example_input``, batch size 1).

    Finds the prunable groups with Torch-Pruning's DependencyGraph, counts dense MACs and
    parameters, and measures the cost model (one pruned trace per group).
    """
    from .task import Task

    name: str | None = None
    if isinstance(task, Task):
        model, example_input = task.model, task.example_input
        ignored_layers = tuple(task.ignored_layers) + tuple(ignored_layers)
        name = task.name
    else:
        model = task
        if example_input is None:
            raise ConfigError("profile_model(model) needs example_input, one input batch of size 1.")
    if example_input.shape[0] != 1:
        raise ConfigError(f"example_input must have batch size 1, got shape {tuple(example_input.shape)}.")
    model.eval()
    kind = type(model).__name__
    model, example_input = _for_tracing(model, example_input)
    try:
        surgeon = pruning.Surgeon(model, example_input, ignored_layers)
    except AutopruneError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(
            f"Torch-Pruning cannot trace the channel dependencies of this {kind} ({type(exc).__name__}: "
            f"{short(exc)}), so autoprune cannot prune it. Its dependency graph does not follow some reshape or "
            "channel shuffle of the forward pass; layers cannot be excluded from the trace itself."
        ) from None
    raw_groups = surgeon.raw_groups
    dense_macs, dense_params = pruning.count_macs_params(model, example_input)
    calls, param_shapes = pruning.trace_calls(model, example_input)

    quantities = Quantities()
    mac_terms: list[tuple[float, list[int], int, int]] = []
    unmodeled_calls = False
    for i, call in enumerate(calls):
        terms, modeled = call_terms(i, call, quantities)
        mac_terms += terms
        unmodeled_calls |= not modeled
    param_num = [
        pad([quantities.add(("param", pname, d), size) for d, size in enumerate(shape)])
        for pname, shape in param_shapes.items()
    ]
    base = np.array(quantities.values)
    columns: dict[str, np.ndarray] = {}
    modules = dict(model.named_modules())
    left_whole = {g.name: _why(g, modules, surgeon.whole[g.name]) for g in raw_groups if g.name in surgeon.whole}
    for group in raw_groups:
        if group.name in left_whole:
            continue
        step = group.step
        if group.channels <= step:
            columns[group.name] = np.zeros(len(base))  # the group cannot lose a unit and keep one
            continue
        # The probe that measures the group's costs is also its test: a group whose pruned copy no
        # longer runs (a reshape that needs the full width, an attention that derives its head size
        # from its input) is left whole here, not found by a shape error in the middle of a search.
        try:
            with surgeon.pruned_in_place({group.name: group.channels - step}) as probe:
                probe_calls, probe_params = pruning.trace_calls(probe, example_input)
        except Exception as exc:
            left_whole[group.name] = _why(group, modules, exc)
            continue
        if [c.module for c in probe_calls] != [c.module for c in calls]:
            left_whole[group.name] = _why(group, modules, "pruning it changes which layers run")
            continue
        columns[group.name] = (base - size_vector(quantities.keys, probe_calls, probe_params)) / step
    left_whole.update(_failing_at_minimum(surgeon, [g for g in raw_groups if g.name in columns], modules,
                                          example_input))
    if not example_input.is_meta:  # a model small enough to run for real (see _for_tracing): check its numbers
        one_step = {g.name: g.channels - g.step for g in raw_groups
                    if g.name in columns and g.name not in left_whole and g.channels > g.step}
        for name, error in pruning.inexact_groups(surgeon, one_step, example_input).items():
            left_whole[name] = _why(next(g for g in raw_groups if g.name == name), modules,
                                    f"removing its channels changes what the rest of the model computes (relative "
                                    f"error {error:.1e}): an operation moves channels in a way Torch-Pruning does not "
                                    "follow (a roll, flip or permutation along channels)")
    raw_groups = [g for g in raw_groups if g.name not in left_whole]
    if not raw_groups:
        reasons = "; ".join(f"{name}: {why}" for name, why in list(left_whole.items())[:4])
        raise UnsupportedModelError(f"No group of this {kind} can be pruned and still run: {reasons}.")
    slopes = np.stack([columns[g.name] for g in raw_groups], axis=1)

    owner_group = np.full(len(base), -1)
    for j in range(len(base)):
        nonzero = np.flatnonzero(slopes[j])
        if nonzero.size:
            owner_group[j] = nonzero[0]
    cost = CostModel(
        base=base,
        slopes=slopes,
        mac_coef=np.array([t[0] for t in mac_terms]),
        mac_num=np.array([pad(t[1]) for t in mac_terms], dtype=np.int64).reshape(-1, _FACTORS),
        mac_den=np.array([t[2] for t in mac_terms], dtype=np.int64),
        mac_owner=np.array([owner_group[t[3]] for t in mac_terms], dtype=np.int64),
        mac_residual=0.0,
        param_num=np.array(param_num, dtype=np.int64).reshape(-1, _FACTORS),
        keys=tuple(quantities.keys),
    )
    modeled = cost.macs(np.zeros(len(raw_groups)))
    # Layers the counter counts but the model does not scale (RNNs, attention) stay constant.
    residual = float(dense_macs - modeled) if unmodeled_calls else 0.0
    object.__setattr__(cost, "mac_residual", residual)

    dense_terms = cost.mac_terms(np.zeros(len(raw_groups)))
    groups = []
    for g, raw in enumerate(raw_groups):
        root = modules[raw.name]
        root_call = next(c for c in calls if c.module == raw.name)
        out_dims = dims(root_call.sizes, "out")
        height = root_call.sizes[out_dims[2]] if len(out_dims) > 2 else 1
        width = root_call.sizes[out_dims[3]] if len(out_dims) > 3 else 1
        kernel = root_call.sizes.get("attr.kernel", 1)
        stride = getattr(root, "stride", (1,))
        macs = float(dense_terms[cost.mac_owner == g].sum())
        groups.append(
            GroupInfo(
                name=raw.name, channels=raw.channels, members=raw.members, macs=macs,
                macs_share=macs / dense_macs if dense_macs else 0.0,
                in_channels=int(root_call.sizes.get("attr.in_channels", root_call.sizes.get("attr.in_features", 0))),
                kernel_size=int(kernel), stride=int(stride[0] if isinstance(stride, tuple) else stride),
                height=int(height), width=int(width), divisor=raw.divisor, kind=raw.kind, unit=raw.unit,
                embedding=raw.embedding,
            )
        )
    ignored = sorted(set(ignored_layers) | {pruning.classifier_name(model, example_input) or ""} - {""})
    return ModelProfile(
        task=name,
        input_shape=tuple(int(d) for d in example_input.shape),
        groups=tuple(groups),
        macs=float(dense_macs),
        params=float(dense_params),
        fingerprint=fingerprint_of([(g.name, g.channels) for g in groups]),
        ignored_layers=tuple(ignored),
        cost=cost,
        left_whole=tuple(left_whole.items()),
    )
