"""Dependency groups and channel surgery: the one place that builds Torch-Pruning's graph.

A model's groups (layers whose channels must go together) are resolved once into the indices every
coupled layer loses per root channel (:class:`Surgeon`); each candidate is then cut from a copy
with Torch-Pruning's own pruning functions, without tracing the model again.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from ..errors import ConfigError
from ._attention import cut_heads, inner_width, prunable_heads, zero_heads
from ._trace import build_graph, trace_limits


_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
#: Layers whose output channels depend on other channels' values beyond a weighted sum.
_CHANNEL_MIXING = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.MultiheadAttention,
                   nn.modules.instancenorm._InstanceNorm)


# ----------------------------------------------------------------------------------------------
# Groups


@dataclass(frozen=True)
class RawGroup:
    """A prunable group as Torch-Pruning's DependencyGraph sees it.

    ``name`` is the root layer's module name (the layer whose output channels lead the group);
    ``members`` are ``"module.name:out"`` / ``"module.name:in"`` for every named layer the group
    prunes, so a residual group lists every conv and BN feeding or reading the shared channels.
    """

    name: str
    channels: int
    members: tuple[str, ...]
    #: channels come in this many equal blocks (the groups of grouped convolutions and
    #: GroupNorms the group feeds; q, k and v of an attention's fused projection), and are removed
    #: evenly from every block: a kept count is a multiple of ``divisor * unit``.
    divisor: int = 1
    #: ``channels`` (whole channels are removed) or ``heads`` (an attention's fused qkv
    #: projection: whole heads are removed, in q, k and v alike)
    kind: str = "channels"
    #: channels per prunable unit within a block: 1, or the head dimension of a ``heads`` group
    unit: int = 1
    #: the residual stream of a transformer (it feeds attention): its width is left whole unless
    #: a search space names the group
    embedding: bool = False

    @property
    def step(self) -> int:
        """The fewest channels the group can lose (one unit from every block)."""
        return self.divisor * self.unit


def _forward_with_hook(
    model: nn.Module, example_input: torch.Tensor, modules: Iterable[nn.Module], hook: Callable[..., None]
) -> None:
    """One eval-mode forward pass with ``hook`` on ``modules``, removed afterwards whatever happens."""
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        for h in handles:
            h.remove()


def _execution_order(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """(name, module) of every leaf module call of one forward pass, in call order; attention
    modules count as leaves (their output projection is not called as a module)."""
    order: list[tuple[str, nn.Module]] = []
    names = {m: n for n, m in model.named_modules()}
    leaves = [m for m in model.modules()
              if not any(True for _ in m.children()) or isinstance(m, nn.MultiheadAttention)]
    _forward_with_hook(model, example_input, leaves, lambda mod, i, o: order.append((names[mod], mod)))
    return order


def classifier_name(model: nn.Module, example_input: torch.Tensor) -> str | None:
    """The last Conv/Linear layer executed: the classifier, whose outputs are never pruned."""
    roots = [name for name, m in _execution_order(model, example_input) if isinstance(m, _ROOT_TYPES)]
    return roots[-1] if roots else None


def _ignored_modules(model: nn.Module, example_input: torch.Tensor, ignored: Iterable[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    names = set(ignored)
    classifier = classifier_name(model, example_input)
    if classifier is not None:
        names.add(classifier)
    unknown = sorted(n for n in names if n not in modules)
    if unknown:
        raise ConfigError(f"ignored_layers names modules the model does not have: {', '.join(unknown)}.")
    return [modules[n] for n in sorted(names)]


def _build_graph(model: nn.Module, example_input: torch.Tensor) -> tuple[tp.DependencyGraph, set[object]]:
    """The dependency graph and the nodes of its channel shuffles (see ``_trace``)."""
    with warnings.catch_warnings():
        # Torch-Pruning names every free-standing parameter (ConvNeXt's layer_scale) on every build
        # and prunes its last non-singleton dimension: the channel dimension, as wanted.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return build_graph(model, example_input)


def _divisor(graph: tp.DependencyGraph, group: object) -> int:
    """In how many equal blocks a group's channels must be removed: the least common multiple of
    the channel groups of its grouped convolutions and GroupNorms (Torch-Pruning's channel groups;
    depthwise convolutions prune per channel and do not count)."""
    blocks = 1
    for item in group:  # type: ignore[attr-defined]
        module, handler = item.dep.target.module, item.dep.handler
        if not isinstance(module, nn.Module):
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.in_channels == module.out_channels:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None:
            continue
        out_side = graph.is_out_channel_pruning_fn(handler)
        groups = pruner.get_out_channel_groups(module) if out_side else pruner.get_in_channel_groups(module)
        if isinstance(groups, int) and groups > 1:
            blocks = math.lcm(blocks, groups)
    return blocks


def _block_indices(scores: np.ndarray | None, channels: int, blocks: int, n_remove: int, unit: int = 1) -> list[int]:
    """The channels to remove: the ``n_remove`` lowest-scored, or for a group in ``blocks`` equal
    blocks the same lowest-scored positions in every block, whole ``unit``s of channels at a time
    (``n_remove`` is a multiple of ``blocks * unit``)."""
    size = channels // blocks
    units = size // unit
    per_block = n_remove // (blocks * unit)
    # Scores repeat per block, and are equal within a unit (see channel_scores).
    unit_scores = scores[:size:unit] if scores is not None else None
    order = np.argsort(unit_scores, kind="stable") if unit_scores is not None else np.arange(units)
    return sorted(b * size + int(u) * unit + j for b in range(blocks) for u in order[:per_block] for j in range(unit))


def _attention_heads(model: nn.Module, name: str, root: nn.Module) -> tuple[str, int] | None:
    """(attention module name, head dimension) when ``root`` is the fused q/k/v projection of an
    attention whose module says its ``num_heads`` (the timm convention most ViT code follows):
    pruning it by channels would break the reshape into heads, so it is pruned by whole heads."""
    parent_name = name.rpartition(".")[0]
    parent = dict(model.named_modules()).get(parent_name)
    heads = getattr(parent, "num_heads", None)
    if not isinstance(root, nn.Linear) or not isinstance(heads, int) or heads < 1:
        return None
    if root.out_features % (3 * heads):
        return None
    return parent_name, root.out_features // (3 * heads)


def _groups_of(
    graph: tp.DependencyGraph, model: nn.Module, ignored: list[nn.Module]
) -> list[tuple[str, nn.Module, object]]:
    names = {m: n for n, m in model.named_modules()}
    found = []
    with trace_limits("grouping layers"):
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=_ROOT_TYPES):
            root = group[0].dep.target.module
            found.append((names[root], root, group))
    return found


def _member_label(item: object, names: Mapping[nn.Module, str], graph: tp.DependencyGraph) -> str | None:
    module = item.dep.target.module  # type: ignore[attr-defined]
    if module not in names:
        return None  # functional ops (add, relu, flatten) have no module name
    side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"  # type: ignore[attr-defined]
    return f"{names[module]}:{side}"


def find_groups(
    model: nn.Module, example_input: torch.Tensor, ignored_layers: Iterable[str] = ()
) -> list[RawGroup]:
    """All prunable groups, in network order (the first layer each group's channels come out of,
    the order AMC's agent walks).

    The classifier (last Conv/Linear executed) and ``ignored_layers`` are left whole; the input
    channels of the first layer are never pruned because no layer produces them.
    """
    return Surgeon(model, example_input, ignored_layers).raw_groups


def _network_order(model: nn.Module, example_input: torch.Tensor, groups: list[RawGroup]) -> list[int]:
    first_call: dict[str, int] = {}
    for i, (name, _) in enumerate(_execution_order(model, example_input)):
        first_call.setdefault(name, i)

    def position(g: int) -> int:
        outs = [m.rsplit(":", 1)[0] for m in groups[g].members if m.endswith((":out", ":heads"))]
        return min((first_call.get(m, len(first_call)) for m in outs), default=len(first_call))

    return sorted(range(len(groups)), key=position)


@dataclass(frozen=True)
class _Cut:
    """One layer's share of a group: the indices of one of its dimensions that each of the group's
    root channels takes away with it (a channel after a flatten is several features, a channel
    through a concatenation sits at an offset)."""

    target: str  # module name, or parameter name for a free-standing nn.Parameter
    is_parameter: bool
    handler: Callable[..., object]  # Torch-Pruning's pruning function for that dimension (or cut_heads)
    pruning_dim: int
    by_root: Mapping[int, tuple[int, ...]]
    out_side: bool = False  # the layer's outputs lose these indices (not its inputs)


@dataclass(frozen=True)
class _GroupCuts:
    channels: int
    blocks: int
    cuts: tuple[_Cut, ...]
    unit: int = 1


def _attention_head_groups(model: nn.Module, ignored: list[nn.Module]) -> list[tuple[RawGroup, _GroupCuts]]:
    """A ``heads`` group per nn.MultiheadAttention whose heads can go (see ``_attention``): its
    packed q/k/v projection's rows in three blocks, a head's rows as the unit."""
    found = []
    for name, module in model.named_modules():
        if module in ignored or not prunable_heads(module):
            continue
        channels, head_dim = 3 * inner_width(module), module.head_dim
        cut = _Cut(name, False, cut_heads, 0, {i: (i,) for i in range(channels)}, out_side=True)
        found.append((RawGroup(name=name, channels=channels, members=(f"{name}:heads",), divisor=3, kind="heads",
                               unit=head_dim), _GroupCuts(channels, 3, (cut,), unit=head_dim)))
    return found


class Surgeon:
    """Prunes copies of one model by kept-channel counts, from its dependency graph traced once.

    Building Torch-Pruning's dependency graph costs a traced forward pass; a search prunes
    hundreds of candidates of the same model. At construction every group is resolved once into
    the indices each coupled layer loses per root channel (Torch-Pruning's own index mapping);
    :meth:`prune` then copies the model and calls Torch-Pruning's pruning functions on the copy's
    layers with the union of those indices, without tracing again.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignored_layers: Iterable[str] = ()) -> None:
        self.model = model.eval()
        graph, shuffle_nodes = _build_graph(model, example_input)
        ignored = _ignored_modules(model, example_input, ignored_layers)
        names = {m: n for n, m in model.named_modules()}
        parameter_names = dict(graph._param_to_name)
        raw: list[RawGroup] = []
        resolved: list[_GroupCuts] = []
        #: head group name -> (attention module name, head dimension)
        self.heads: dict[str, tuple[str, int]] = {}
        #: group name -> why it must be left whole although Torch-Pruning couples it correctly
        self.whole: dict[str, str] = {}
        for name, root, group in _groups_of(graph, model, ignored):  # each with all its channels
            if any(item.dep.target in shuffle_nodes for item in group):
                self.whole[name] = ("its channels pass through a channel shuffle, which needs every shuffled "
                                    "block to lose the same positions; exclude it or leave it whole")
            members: list[str] = []
            cuts = []
            for item in group:
                label = _member_label(item, names, graph)
                if label is not None and label not in members:
                    members.append(label)
                dep, target = item.dep, item.dep.target.module
                by_root: dict[int, list[int]] = {}
                # Torch-Pruning keeps, beside each layer's indices, the root channel each came from.
                for index, root_index in zip(item.idxs, getattr(item, "root_idxs", item.idxs)):
                    by_root.setdefault(int(root_index), []).append(int(index))
                is_parameter = isinstance(target, nn.Parameter)
                cut_label = parameter_names.get(target) if is_parameter else names.get(target)
                if cut_label is None:
                    continue  # a functional op (add, cat, flatten): nothing to cut
                cuts.append(_Cut(cut_label, is_parameter, dep.handler, int(dep.target.pruning_dim),
                                 {r: tuple(v) for r, v in by_root.items()},
                                 out_side=bool(graph.is_out_channel_pruning_fn(dep.handler))))
            channels = int(graph.get_out_channels(root))
            heads = _attention_heads(model, name, root)
            if heads is not None:
                self.heads[name] = heads
                raw.append(RawGroup(name=name, channels=channels, members=tuple(members), divisor=3,
                                    kind="heads", unit=heads[1]))
                resolved.append(_GroupCuts(channels, 3, tuple(cuts), unit=heads[1]))
            else:
                blocks = _divisor(graph, group)
                raw.append(RawGroup(name=name, channels=channels, members=tuple(members), divisor=blocks))
                resolved.append(_GroupCuts(channels, blocks, tuple(cuts)))
        # The residual stream of a transformer feeds its attention: the input of a fused qkv
        # projection, or an nn.MultiheadAttention (whose heads are sized by that width).
        attention_inputs = {f"{head}:in" for head in self.heads} | {
            f"{n}:in" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)} | {
            f"{n}:out" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
        raw = [replace(g, embedding=bool(attention_inputs & set(g.members))) for g in raw]
        for group, cuts in _attention_head_groups(model, ignored):
            raw.append(group)
            resolved.append(cuts)
            for other, other_cuts in zip(raw, resolved):
                if other.embedding and any(c.target == group.name for c in other_cuts.cuts):
                    # Torch-Pruning's cut of the stream assumes every head is still there.
                    self.whole[other.name] = (f"the residual stream of {group.name}, whose heads are pruned instead "
                                              "(pruning both is not supported)")
        order = _network_order(model, example_input, raw)
        self.raw_groups = [raw[i] for i in order]
        self.groups: dict[str, _GroupCuts] = {raw[i].name: resolved[i] for i in order}

    def _removals(self, kept: Mapping[str, int],
                  scores: Mapping[str, np.ndarray] | None) -> list[tuple[_Cut, list[int]]]:
        removals: dict[tuple[str, object, int], tuple[_Cut, set[int]]] = {}
        for name, keep in kept.items():
            if name not in self.groups:
                raise ConfigError(f"The model has no prunable group {name!r}; groups: {', '.join(self.groups)}.")
            group = self.groups[name]
            n_remove = group.channels - int(keep)
            if n_remove <= 0:
                continue
            step = group.blocks * group.unit
            if n_remove % step or n_remove >= group.channels:
                raise ConfigError(
                    f"Group {name!r} has {group.channels} channels in {group.blocks} equal block(s) of units of "
                    f"{group.unit}; it can only lose a multiple of {step} and must keep at least {step}, not lose "
                    f"{n_remove}. Plans made by autoprune respect this."
                )
            roots = _block_indices(scores[name] if scores is not None else None, group.channels, group.blocks,
                                   n_remove, group.unit)
            for cut in group.cuts:
                # Layers fed by several groups (a concatenation) lose the union, in dense coordinates.
                _, indices = removals.setdefault((cut.target, cut.handler, cut.pruning_dim), (cut, set()))
                for root in roots:
                    indices.update(cut.by_root.get(root, ()))
        return [(cut, sorted(indices)) for cut, indices in removals.values() if indices]

    def _heads_after(self, kept: Mapping[str, int]) -> dict[str, int]:
        """Attention module name -> its head count once ``kept`` is applied."""
        return {module: int(kept[name]) // (3 * head_dim) for name, (module, head_dim) in self.heads.items()
                if name in kept and int(kept[name]) < self.groups[name].channels}

    def _apply(self, model: nn.Module, removals: list[tuple[_Cut, list[int]]], heads: Mapping[str, int]) -> None:
        modules = dict(model.named_modules())
        for module, count in heads.items():
            modules[module].num_heads = count  # the reshape into heads reads it; head_dim stays
        for cut, indices in removals:
            if hasattr(cut.handler, "__self__"):  # as Torch-Pruning's Dependency does before calling its pruner
                cut.handler.__self__.pruning_dim = cut.pruning_dim  # type: ignore[attr-defined]
            if cut.is_parameter:
                owner_name, _, attr = cut.target.rpartition(".")
                owner = modules[owner_name]
                setattr(owner, attr, cut.handler(getattr(owner, attr), indices))
            else:
                cut.handler(modules[cut.target], indices)

    def prune(self, kept: Mapping[str, int], scores: Mapping[str, np.ndarray] | None = None) -> nn.Module:
        """A copy of the model with each group in ``kept`` cut to that many output channels, the
        lowest-scored ones removed (the first ones without ``scores``)."""
        pruned = copy.deepcopy(self.model).eval()
        self._apply(pruned, self._removals(kept, scores), self._heads_after(kept))
        return pruned

    def zeroable(self, name: str) -> bool:
        """Whether zeroing group ``name``'s channels leaves the other channels' outputs alone: no
        layer it feeds normalizes across channels (LayerNorm, GroupNorm) or mixes them inside
        (nn.MultiheadAttention)."""
        modules = dict(self.model.named_modules())
        return not any(isinstance(modules.get(cut.target), _CHANNEL_MIXING) and cut.handler is not cut_heads
                       for cut in self.groups[name].cuts)

    def zeroed_copy(self, kept: Mapping[str, int], scores: Mapping[str, np.ndarray] | None = None) -> nn.Module:
        """A copy of the dense model whose channels that :meth:`prune` would remove output zeros.

        Removing channels that carry only zeros changes no output, so ``prune(kept, scores)`` and
        this copy compute the same function exactly when the groups couple the right channels: the
        check of a pruning's correctness (not only of its shapes). Refuses (ConfigError) a plan
        whose removed channels feed a layer that normalizes across channels (LayerNorm,
        GroupNorm), where a zero channel still changes the other channels' outputs.
        """
        if unzeroable := [name for name in kept if not self.zeroable(name)]:
            raise ConfigError(f"Groups {', '.join(unzeroable)} feed a layer that mixes channels through their "
                              "statistics; zeroing channels is not equivalent to removing them there.")
        zeroed = copy.deepcopy(self.model).eval()
        modules = dict(zeroed.named_modules())
        parameters = dict(zeroed.named_parameters())
        with torch.no_grad():
            for cut, indices in self._removals(kept, scores):
                if cut.is_parameter:
                    parameters[cut.target].index_fill_(cut.pruning_dim, torch.tensor(indices), 0.0)
                    continue
                module = modules[cut.target]
                if cut.handler is cut_heads:
                    zero_heads(module, indices)  # type: ignore[arg-type]
                    continue
                if not cut.out_side:
                    continue  # its inputs are zero already
                if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
                    dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
                    for name in ("weight", "bias"):
                        if (tensor := getattr(module, name, None)) is not None:
                            tensor.index_fill_(dim if name == "weight" else 0, torch.tensor(indices), 0.0)
                elif any(True for _ in module.parameters(recurse=False)):
                    raise ConfigError(f"{cut.target} ({type(module).__name__}): cannot zero its output channels.")
        return zeroed

    @contextmanager
    def pruned_in_place(self, kept: Mapping[str, int]) -> Iterator[nn.Module]:
        """The surgeon's own model cut to ``kept`` for the duration of the block, then restored
        exactly (every touched layer's attributes, parameters and buffers are put back): how the
        profile measures one group at a time without copying the model for each."""
        removals = self._removals(kept, None)
        heads = self._heads_after(kept)
        modules = dict(self.model.named_modules())
        touched = {cut.target.rpartition(".")[0] if cut.is_parameter else cut.target for cut, _ in removals}
        touched |= set(heads)
        # Handlers may also cut a layer's children (an nn.MultiheadAttention prunes its out_proj).
        touched = {name for name in modules if any(name == t or name.startswith(t + ".") for t in touched)}
        saved = {name: (modules[name].__class__, dict(modules[name].__dict__), dict(modules[name]._parameters),
                        dict(modules[name]._buffers)) for name in touched}
        try:
            self._apply(self.model, removals, heads)
            yield self.model
        finally:
            for name, (cls, attrs, parameters, buffers) in saved.items():
                module = modules[name]
                module.__class__ = cls  # cut_heads changes an attention's class
                module.__dict__.clear()
                module.__dict__.update(attrs)
                module._parameters.clear()
                module._parameters.update(parameters)
                module._buffers.clear()
                module._buffers.update(buffers)


def prune_copy(
    model: nn.Module,
    example_input: torch.Tensor,
    kept: Mapping[str, int],
    scores: Mapping[str, np.ndarray] | None = None,
) -> nn.Module:
    """A deep copy of ``model`` with each group in ``kept`` cut to that many output channels.

    ``kept`` maps group (root module) names to the number of channels to keep; the removed
    channels are the lowest-scored in ``scores`` (the first channels when scores are absent, used
    only where weights do not matter). ``model`` itself is left untouched. To prune many copies of
    one model, make one :class:`Surgeon` and call its ``prune``.
    """
    if not any(True for _ in kept):
        return copy.deepcopy(model).eval()
    return Surgeon(model, example_input).prune(kept, scores)


def shape_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the ``meta`` device: shapes without
    data, so tracing, dependency graphs and pruning cost no memory and no arithmetic. Parameters
    are not copied, which makes this cheap even for a model of a billion weights."""
    memo: dict[int, object] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo).eval()


