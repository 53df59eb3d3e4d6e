"""MACs and parameters as Torch-Pruning counts them, and the per-call trace the analytic cost
model is fitted from (:mod:`autoprune.profile`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.utils.op_counter import MODULES_MAPPING as _COUNTED_TYPES


from ._attention import HeadPrunedMultiheadAttention, inner_width
from ._graph import _forward_with_hook

def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) for one forward pass of ``example_input``, as Torch-Pruning counts them."""
    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), int(params)


# ----------------------------------------------------------------------------------------------
# Tracing for the analytic cost model


@dataclass(frozen=True)
class CallRecord:
    """One call of a layer that Torch-Pruning's counter counts, with every size its count uses.

    ``sizes`` names each quantity (``in.1`` = input dim 1, ``out.0``, ``attr.groups``, ...) so that
    the same call in a pruned copy can be compared size by size.
    """

    module: str
    kind: str
    sizes: Mapping[str, int]
    has_bias: bool
    affine: bool


_KIND_BY_TYPE: dict[type, str] = {}
for _t in _COUNTED_TYPES:
    if issubclass(_t, nn.modules.conv._ConvNd):
        _KIND_BY_TYPE[_t] = "conv"
    elif _t is nn.Linear:
        _KIND_BY_TYPE[_t] = "linear"
    elif issubclass(_t, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        _KIND_BY_TYPE[_t] = "norm"
    elif _t is nn.LayerNorm:
        _KIND_BY_TYPE[_t] = "layernorm"
    elif "Pool" in _t.__name__:
        _KIND_BY_TYPE[_t] = "pool"
    elif _t in (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.GELU, nn.Upsample):
        _KIND_BY_TYPE[_t] = "activation"
    else:
        _KIND_BY_TYPE[_t] = "other"
_KIND_BY_TYPE[HeadPrunedMultiheadAttention] = "attention"


def _modeled_attention(module: nn.Module) -> bool:
    """An attention whose count the cost model reproduces: q, k and v from inputs of one width,
    packed, without the extra key/value options."""
    return (isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim
            and module.bias_k is None and not module.add_zero_attn)


def _attention_sizes(module: nn.MultiheadAttention, inputs: tuple) -> dict[str, int]:
    query, key, value = inputs[:3]
    seq = 1 if module.batch_first else 0
    return {"attn.batch": int(query.shape[1 - seq]), "attn.qlen": int(query.shape[seq]),
            "attn.klen": int(key.shape[seq]), "attn.vlen": int(value.shape[seq]), "attn.embed": int(query.shape[-1]),
            "attr.inner": inner_width(module), "attr.num_heads": int(module.num_heads)}


def trace_calls(model: nn.Module, example_input: torch.Tensor) -> tuple[list[CallRecord], dict[str, tuple[int, ...]]]:
    """Record every counted layer call of one forward pass, and every parameter's shape."""
    names = {m: n for n, m in model.named_modules()}
    records: list[CallRecord] = []

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        kind = _KIND_BY_TYPE[type(module)]
        sizes: dict[str, int] = {}
        if isinstance(module, nn.MultiheadAttention) and _modeled_attention(module) and len(inputs) >= 3 \
                and all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in inputs[:3]):
            kind = "attention"
            sizes.update(_attention_sizes(module, inputs))
        if inputs and isinstance(inputs[0], torch.Tensor):
            sizes.update({f"in.{i}": int(d) for i, d in enumerate(inputs[0].shape)})
        if isinstance(output, torch.Tensor):
            sizes.update({f"out.{i}": int(d) for i, d in enumerate(output.shape)})
        for attr in ("in_channels", "out_channels", "groups", "in_features", "out_features"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                sizes[f"attr.{attr}"] = value
        if kind == "conv":
            sizes["attr.kernel"] = int(np.prod(module.kernel_size))  # type: ignore[arg-type]
        records.append(
            CallRecord(
                module=names[module], kind=kind, sizes=sizes,
                has_bias=getattr(module, "bias", getattr(module, "in_proj_bias", None)) is not None,
                affine=bool(getattr(module, "affine", getattr(module, "elementwise_affine", False))),
            )
        )

    with _shape_only_norms(model, example_input):
        _forward_with_hook(model, example_input, [m for m in model.modules() if type(m) in _KIND_BY_TYPE], hook)
    params = {name: tuple(int(d) for d in p.shape) for name, p in model.named_parameters()}
    return records, params


@contextmanager
def _shape_only_norms(model: nn.Module, example_input: torch.Tensor) -> Iterator[None]:
    """On meta tensors, run normalization layers as the identity while tracing shapes: their
    output is shaped as their input, and torch computes meta BatchNorm through a Python
    decomposition that costs milliseconds a call (most of a large model's trace)."""
    norms = [m for m in model.modules() if isinstance(m, _NORM_TYPES)] if example_input.is_meta else []
    for module in norms:
        module.forward = _identity  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module in norms:
            del module.forward


def _identity(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return x


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
