"""Importance criteria: small interchangeable classes that score the channels of a group."""

from __future__ import annotations

import abc
import copy
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from ..errors import ConfigError

from ._attention import head_scores, prunable_heads
from ._graph import _attention_heads, _build_graph, _divisor, _groups_of, _ignored_modules

# ----------------------------------------------------------------------------------------------
# Importance criteria


class ChannelImportance(abc.ABC):
    """Scores every channel of a group; the lowest-scored channels are removed first.

    Scores are normalized by their mean within the group (as Torch-Pruning's global ranking does),
    so they are comparable across groups.
    """

    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = False

    @abc.abstractmethod
    def _scorer(self) -> Callable[[object], torch.Tensor]:
        """A Torch-Pruning importance that maps a group to one score per root channel."""

    def scores(self, group: object, group_name: str) -> np.ndarray:
        return self._scorer()(group).detach().cpu().double().numpy()


class L1Importance(ChannelImportance):
    """Mean L1 norm of the channel's weights over all coupled layers (Li et al., 2017)."""

    name = "l1"

    def _scorer(self) -> Callable[[object], torch.Tensor]:
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer="mean")


class L2Importance(ChannelImportance):
    """Mean L2 norm of the channel's weights over all coupled layers."""

    name = "l2"

    def _scorer(self) -> Callable[[object], torch.Tensor]:
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean")


class TaylorImportance(ChannelImportance):
    """First-order Taylor estimate of the loss change when the channel goes (Molchanov et al., 2019).

    Needs gradients of the loss on training batches; :func:`channel_scores` computes them.
    """

    name = "taylor"
    needs_gradients = True

    def _scorer(self) -> Callable[[object], torch.Tensor]:
        return tp.importance.GroupTaylorImportance(normalizer="mean")


class BNScaleImportance(ChannelImportance):
    """Magnitude of the BatchNorm scale that follows the channel (Network Slimming, Liu et al., 2017)."""

    name = "bn_scale"

    def _scorer(self) -> Callable[[object], torch.Tensor]:
        return tp.importance.BNScaleImportance(normalizer="mean")


class RandomImportance(ChannelImportance):
    """Uniformly random scores, seeded per group: the control for the other criteria."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _scorer(self) -> Callable[[object], torch.Tensor]:  # pragma: no cover - scores() overrides
        raise NotImplementedError

    def scores(self, group: object, group_name: str) -> np.ndarray:
        digest = hashlib.sha256(f"{self.seed}:{group_name}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        n = len(group[0][1])  # type: ignore[index]
        values = rng.random(n)
        return values / values.mean()


_IMPORTANCES: dict[str, type[ChannelImportance]] = {
    cls.name: cls for cls in (L1Importance, L2Importance, TaylorImportance, BNScaleImportance, RandomImportance)
}
IMPORTANCE_NAMES: tuple[str, ...] = tuple(_IMPORTANCES)


def make_importance(name_or_instance: str | ChannelImportance, *, seed: int = 0) -> ChannelImportance:
    """Look up an importance criterion by name (``l1``, ``l2``, ``taylor``, ``bn_scale``, ``random``)."""
    if isinstance(name_or_instance, ChannelImportance):
        return name_or_instance
    try:
        cls = _IMPORTANCES[name_or_instance]
    except KeyError:
        raise ConfigError(
            f"Unknown importance criterion {name_or_instance!r}; allowed: {', '.join(IMPORTANCE_NAMES)}."
        ) from None
    return cls(seed) if cls is RandomImportance else cls()  # type: ignore[call-arg]


def channel_scores(
    model: nn.Module,
    example_input: torch.Tensor,
    importance: ChannelImportance,
    *,
    ignored_layers: Iterable[str] = (),
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Per-group channel scores of the dense ``model`` (higher = keep), shape (channels,) each.

    Computed once per model and criterion: which channels a plan removes then depends only on how
    many, so every candidate of a search prunes consistently. ``model`` is not modified; gradient
    criteria run on a copy over ``batches``.
    """
    work = model
    if importance.needs_gradients:
        if not batches:
            raise ConfigError(
                f"Importance {importance.name!r} needs training batches to compute gradients; pass "
                "batches=[(inputs, targets), ...] or choose l1, l2, bn_scale or random."
            )
        work = copy.deepcopy(model).eval()
        loss_fn = loss_fn or nn.functional.cross_entropy
        work.zero_grad(set_to_none=True)
        for x, y in batches:
            loss_fn(work(x), y).backward()
    graph, _ = _build_graph(work, example_input)
    ignored = _ignored_modules(work, example_input, ignored_layers)
    scores = {}
    for name, root, group in _groups_of(graph, work, ignored):
        values = importance.scores(group, name)
        heads = _attention_heads(work, name, root)
        blocks, unit = (3, heads[1]) if heads else (_divisor(graph, group), 1)
        if blocks > 1 or unit > 1:
            # Channels of grouped layers go the same way in every block (as Torch-Pruning prunes
            # them), and a head goes whole: each unit's score is its mean over the blocks and its
            # channels, repeated for each of them.
            per_unit = values.reshape(blocks, -1, unit).mean(axis=(0, 2))
            values = np.tile(np.repeat(per_unit, unit), blocks)
        scores[name] = values
    for name, module in work.named_modules():
        if module not in ignored and prunable_heads(module):
            scores[name] = head_scores(module, importance.name, name, getattr(importance, "seed", 0))
    return scores


