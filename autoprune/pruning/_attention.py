"""Heads of ``nn.MultiheadAttention`` as a prunable group (torchvision's VisionTransformer).

``nn.MultiheadAttention`` ties the width q, k and v are projected to (``num_heads * head_dim``) to
its ``embed_dim``, the width of the residual stream it reads and writes. Removing heads narrows
the first without touching the second, which the module cannot represent; a copy whose heads were
cut therefore becomes :class:`HeadPrunedMultiheadAttention`, the same computation on the narrower
projection. Torch-Pruning sees an attention module as one node whose channels are the residual
stream, so the heads group is built here, beside its dependency groups.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch_pruning.utils import op_counter


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with fewer heads than ``embed_dim // head_dim``.

    ``in_proj_weight`` is (3 * inner, embed_dim) and ``out_proj`` maps inner back to embed_dim,
    where ``inner = num_heads * head_dim``. Called as ``nn.MultiheadAttention`` is; returns
    ``(output, weights)`` with weights ``None`` unless ``need_weights``.
    """

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # (length, batch, embed) from here, as nn.MultiheadAttention computes.
        length, batch, _ = query.shape
        source = key.shape[0]
        inner = self.num_heads * self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.split(inner)
        b_q, b_k, b_v = self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None, None, None)

        def heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            # (length, batch, inner) -> (batch, heads, length, head_dim)
            return F.linear(x, w, b).reshape(x.shape[0], batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v)
        mask = _additive_mask(attn_mask, key_padding_mask, batch, self.num_heads, length, source, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones(length, source, dtype=torch.bool).triu(1), float("-inf"))
            weights = F.dropout(scores.softmax(dim=-1), dropout, self.training)
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, inner))
        if unbatched:
            return out.squeeze(1), (weights.squeeze(0) if weights is not None else None)
        return (out.transpose(0, 1) if self.batch_first else out), weights


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, heads: int,
                   length: int, source: int, dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (boolean True = not attended, or float added) as one float
    mask of shape (batch, heads, length, source), or None."""
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    total = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        total = mask.reshape(batch, heads, length, source) if mask.dim() == 3 else mask.expand(batch, heads, length, source)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).reshape(batch, 1, 1, source)
        total = padding.expand(batch, heads, length, source) if total is None else total + padding
    return total


def prunable_heads(module: nn.Module) -> bool:
    """Whether ``module`` is an attention whose heads autoprune can remove: q, k and v of the
    embedding width in one packed projection, without the extra key/value biases or zero
    attention of the rarer options."""
    return (isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim
            and module.bias_k is None and not module.add_zero_attn and module.num_heads > 1)


def inner_width(module: nn.MultiheadAttention) -> int:
    """The width q, k and v are projected to: ``num_heads * head_dim``."""
    return module.num_heads * module.head_dim


def cut_heads(module: nn.MultiheadAttention, idxs: Sequence[int]) -> nn.MultiheadAttention:
    """Remove rows ``idxs`` of the packed q/k/v projection (whole heads, the same ones in q, k and
    v) and the matching inputs of the output projection, in place."""
    inner = inner_width(module)
    removed = set(int(i) for i in idxs)
    keep = torch.tensor([i for i in range(3 * inner) if i not in removed])
    values = keep[keep >= 2 * inner] - 2 * inner
    module.in_proj_weight = nn.Parameter(module.in_proj_weight.data[keep].clone(),
                                         requires_grad=module.in_proj_weight.requires_grad)
    if module.in_proj_bias is not None:
        module.in_proj_bias = nn.Parameter(module.in_proj_bias.data[keep].clone(),
                                           requires_grad=module.in_proj_bias.requires_grad)
    out = module.out_proj
    out.weight = nn.Parameter(out.weight.data[:, values].clone(), requires_grad=out.weight.requires_grad)
    out.in_features = len(values)
    module.num_heads = len(values) // module.head_dim
    module.__class__ = HeadPrunedMultiheadAttention
    return module


def zero_heads(module: nn.MultiheadAttention, idxs: Sequence[int]) -> None:
    """Zero rows ``idxs`` of the packed projection: the head attends uniformly to zero values,
    so its output is zero, as if it were removed."""
    index = torch.tensor(sorted(int(i) for i in idxs))
    with torch.no_grad():
        module.in_proj_weight.index_fill_(0, index, 0.0)
        if module.in_proj_bias is not None:
            module.in_proj_bias.index_fill_(0, index, 0.0)


def head_scores(module: nn.MultiheadAttention, criterion: str, name: str, seed: int = 0) -> np.ndarray:
    """One score per row of the packed projection (3 * inner), equal within a head and repeated for
    q, k and v (a head goes whole), normalized by its mean: the magnitude (``l2``: L2 norm, else
    L1) of the head's q, k, v rows and its output-projection columns, or with ``taylor`` of
    weight times gradient where gradients were computed; ``random`` is seeded per group."""
    heads = module.num_heads
    if criterion == "random":
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        per_head = np.random.default_rng(int.from_bytes(digest[:8], "little")).random(heads)
    else:
        def magnitude(w: torch.Tensor) -> torch.Tensor:
            if criterion == "taylor" and w.grad is not None:
                w = w * w.grad
            return w.detach().abs().pow(2 if criterion == "l2" else 1)

        rows = magnitude(module.in_proj_weight).reshape(3, heads, -1).sum(dim=(0, 2))
        columns = magnitude(module.out_proj.weight).reshape(-1, heads, module.head_dim).sum(dim=(0, 2))
        per_head = (rows + columns).double().numpy()
        per_head = np.sqrt(per_head) if criterion == "l2" else per_head
    per_head = per_head / per_head.mean() if per_head.mean() > 0 else np.ones(heads)
    return np.tile(np.repeat(per_head, module.head_dim), 3)


def _count_pruned_attention(module: HeadPrunedMultiheadAttention, inputs: tuple, output: object) -> None:
    """Torch-Pruning's MACs count of nn.MultiheadAttention with the projected width ``inner``
    in place of ``embed_dim`` where the heads use it (equal to its count when no head is removed)."""
    module.__flops__ += int(attention_macs(*inputs[:3], module))


def attention_macs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, module: nn.MultiheadAttention) -> float:
    """MACs of one call, as :func:`autoprune.profile` models them (see ``_call_terms``)."""
    seq = 1 if module.batch_first else 0
    batch = query.shape[1 - seq] if query.dim() == 3 else 1
    qlen, klen, vlen = query.shape[seq], key.shape[seq], value.shape[seq]
    embed, inner, heads = query.shape[-1], inner_width(module), module.num_heads
    macs = qlen * inner + (qlen + klen + vlen) * embed * inner
    if module.in_proj_bias is not None:
        macs += (qlen + klen + vlen) * inner
    macs += heads * qlen * klen + 2 * qlen * klen * inner + qlen * inner * embed + qlen * embed
    return float(batch * macs)


# Torch-Pruning's counter looks layers up by exact type; its per-call custom table is cleared
# after every count, so the pruned attention is registered in its permanent one.
op_counter.MODULES_MAPPING.setdefault(HeadPrunedMultiheadAttention, _count_pruned_attention)
