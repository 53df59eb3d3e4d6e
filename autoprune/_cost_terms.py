"""The analytic cost model's terms: each counted layer call's MACs as products of named sizes.

A profile traces the dense model once and records every size Torch-Pruning's counter uses
(``in.1``, ``attr.out_channels``, ...); each size is a *quantity* that changes linearly with the
channels a group removes. A layer's MACs are then sums of products of quantities
(:func:`call_terms`), mirroring Torch-Pruning's counter hooks, so the MACs of any plan follow from
the quantities' slopes without tracing the pruned model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import pruning
from .errors import AutopruneError

_ONE = 0  # index of the constant quantity 1, used to pad products
_FACTORS = 8


class Quantities:
    """Interns (call or parameter, size name) keys into quantity indices; index 0 is the constant 1."""

    def __init__(self) -> None:
        self.keys: list[tuple[Any, ...]] = [("one",)]
        self.values: list[float] = [1.0]
        self._index: dict[tuple[Any, ...], int] = {("one",): 0}

    def add(self, key: tuple[Any, ...], value: float) -> int:
        if key not in self._index:
            self._index[key] = len(self.keys)
            self.keys.append(key)
            self.values.append(float(value))
        return self._index[key]


def dims(sizes: Mapping[str, int], prefix: str) -> list[str]:
    return sorted((k for k in sizes if k.startswith(prefix + ".")), key=lambda k: int(k.split(".")[1]))


def call_terms(
    i: int, call: pruning.CallRecord, quantities: Quantities
) -> tuple[list[tuple[float, list[int], int, int]], bool]:
    """(coef, numerator quantities, denominator quantity, owner quantity) per MAC term of a call.

    Mirrors Torch-Pruning's counter hooks; returns ``modeled=False`` for kinds it does not scale.
    """
    s = call.sizes

    def q(name: str) -> int:
        return quantities.add(("call", i, name), s[name])

    ins, outs = [q(k) for k in dims(s, "in")], [q(k) for k in dims(s, "out")]
    if call.kind == "conv":
        spatial = [q(k) for k in dims(s, "out")[2:]]
        batch = q("in.0")
        out_ch = q("attr.out_channels")
        terms = [(1.0, [q("attr.kernel"), q("attr.in_channels"), out_ch, batch, *spatial], q("attr.groups"), out_ch)]
        if call.has_bias:
            terms.append((1.0, [out_ch, batch, *spatial], _ONE, out_ch))
        return terms, True
    if call.kind == "linear":
        last = outs[-1]
        terms = [(1.0, [*ins, last], _ONE, last)]
        if call.has_bias:
            terms.append((1.0, [last], _ONE, last))
        return terms, True
    if call.kind in ("norm", "layernorm"):
        owner = ins[1] if call.kind == "norm" else ins[-1]
        return [(2.0 if call.affine else 1.0, ins, _ONE, owner)], True
    if call.kind == "pool":
        return [(1.0, ins, _ONE, ins[1] if len(ins) > 1 else ins[0])], True
    if call.kind == "activation":
        return [(1.0, outs, _ONE, outs[1] if len(outs) > 1 else outs[0])], True
    if call.kind == "attention":
        # Torch-Pruning's count of nn.MultiheadAttention, with the projected width (inner) apart
        # from the embedding width where heads use it (pruning.attention_macs: the same sum).
        batch, qlen, klen, vlen = q("attn.batch"), q("attn.qlen"), q("attn.klen"), q("attn.vlen")
        embed, inner, heads = q("attn.embed"), q("attr.inner"), q("attr.num_heads")
        terms = [(1.0, [batch, qlen, inner], _ONE, inner)]
        terms += [(1.0, [batch, length, embed, inner], _ONE, inner) for length in (qlen, klen, vlen)]
        if call.has_bias:
            terms += [(1.0, [batch, length, inner], _ONE, inner) for length in (qlen, klen, vlen)]
        terms += [(1.0, [batch, heads, qlen, klen], _ONE, inner), (2.0, [batch, qlen, klen, inner], _ONE, inner),
                  (1.0, [batch, qlen, inner, embed], _ONE, inner), (1.0, [batch, qlen, embed], _ONE, embed)]
        return terms, True
    return [], False


def pad(indices: list[int]) -> list[int]:
    if len(indices) > _FACTORS:
        raise AutopruneError(f"a layer's cost has {len(indices)} factors; at most {_FACTORS} are modeled")
    return indices + [_ONE] * (_FACTORS - len(indices))


def size_vector(
    keys: list[tuple[Any, ...]], calls: list[pruning.CallRecord], params: Mapping[str, tuple[int, ...]]
) -> np.ndarray:
    values = np.empty(len(keys))
    for j, key in enumerate(keys):
        if key[0] == "one":
            values[j] = 1.0
        elif key[0] == "call":
            values[j] = calls[key[1]].sizes[key[2]]
        else:
            values[j] = params[key[1]][key[2]]
    return values
