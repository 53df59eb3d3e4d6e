"""Torch-Pruning's dependency graph, with the channel shuffles it cannot follow made explicit.

ShuffleNet's channel shuffle (``x.view(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)``)
permutes channels. Torch-Pruning 1.6 maps indices through 2-D and 4-D reshapes only: on the
shuffle it either divides by zero (its channel inference through the 5-D view finds 0 channels)
or, once past that, passes indices through unchanged, which couples the wrong channels. Here the
shuffle's two views become plain element-wise nodes carrying the permutation as their index
mapping, so the graph couples the right channels; and the nodes are reported, because a shuffle
also needs every block of ``c // g`` channels to lose the same positions (``chunk`` and the view
split by position at run time), a constraint a dependency group cannot express. The groups whose
channels pass through a shuffle are therefore left whole; the rest of the model is pruned.

Torch-Pruning's split sizes are also read from what autograd saved (``chunk`` and ``split``
along channels): its own reader looks for attribute names older PyTorch versions used and falls
back to inferring the sizes, which goes wrong around a shuffle.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping, shape_infer

from ..errors import UnsupportedModelError

_VIEWS = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")
_COPIES = ("CloneBackward0",)

# Torch-Pruning's index-mapping update for each node type it maps (called again before every
# group it resolves, so a node it must not touch has to stop being of that type).
_UPDATES = {
    ops.OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
    ops.OPTYPE.SPLIT: index_mapping.update_split_index_mapping,
    ops.OPTYPE.RESHAPE: index_mapping.update_reshape_index_mapping,
    ops.OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
    ops.OPTYPE.EXPAND: index_mapping.update_expand_index_mapping,
    ops.OPTYPE.SLICE: index_mapping.update_slice_index_mapping,
}


class _Permutation:
    """Index mapping of a channel permutation: channel ``i`` becomes ``table[i]``."""

    def __init__(self, table: list[int]) -> None:
        self.table = table

    def __call__(self, idxs: list[_helpers._HybridIndex]) -> list[_helpers._HybridIndex]:
        return [_helpers._HybridIndex(idx=self.table[i.idx], root_idx=i.root_idx) for i in idxs]


def _sizes(grad_fn: object) -> tuple[int, ...]:
    return tuple(int(s) for s in (getattr(grad_fn, "_saved_self_sym_sizes", None) or ()))


def _shuffle_at(node: object, by_grad_fn: dict[object, object]) -> tuple[object, int, int] | None:
    """(entry view node, channels per group, groups) when ``node`` is the closing view of a channel
    shuffle: a view of a (b, c/g, g, h, w) tensor that a transpose of dims 1 and 2 made from a view
    of a (b, c, h, w) one."""
    grad_fn = node.grad_fn  # type: ignore[attr-defined]
    size = _sizes(grad_fn)
    if type(grad_fn).__name__ not in _VIEWS or len(size) != 5:
        return None
    step = grad_fn.next_functions[0][0]
    while step is not None and type(step).__name__ in _COPIES:
        step = step.next_functions[0][0]
    if step is None or type(step).__name__ != "TransposeBackward0":
        return None
    if {int(step._saved_dim0) % 5, int(step._saved_dim1) % 5} != {1, 2}:
        return None
    entry = step.next_functions[0][0]
    entry_size = _sizes(entry)
    if type(entry).__name__ not in _VIEWS or len(entry_size) != 4 or entry not in by_grad_fn:
        return None
    per_group, groups = size[1], size[2]
    if entry_size[1] != per_group * groups:
        return None
    return by_grad_fn[entry], per_group, groups


def _map_shuffles(graph: tp.DependencyGraph) -> set[object]:
    """Give every channel shuffle its permutation; returns the shuffles' nodes."""
    by_grad_fn = {node.grad_fn: node for node in graph.module2node.values() if node.grad_fn is not None}
    shuffle_nodes: set[object] = set()
    for node in list(graph.module2node.values()):
        if node.type != ops.OPTYPE.RESHAPE or (found := _shuffle_at(node, by_grad_fn)) is None:
            continue
        entry, per_group, groups = found
        # Channel g * per_group + j of the input is channel j * groups + g of the output.
        forward = [(i % per_group) * groups + i // per_group for i in range(per_group * groups)]
        backward = [0] * len(forward)
        for i, j in enumerate(forward):
            backward[j] = i
        for source in node.inputs:
            for dep in node.dependencies:
                if dep.target == source:
                    dep.index_mapping[0] = _Permutation(backward)
            for dep in source.dependencies:
                if dep.target == node:
                    dep.index_mapping[0] = _Permutation(forward)
        for view in (node, entry):
            view.type = ops.OPTYPE.ELEMENTWISE  # Torch-Pruning's reshape mapping must not run on it
            shuffle_nodes.add(view)
    return shuffle_nodes


def _read_split_sizes(graph: tp.DependencyGraph) -> None:
    for node in graph.module2node.values():
        if node.type != ops.OPTYPE.SPLIT:
            continue
        grad_fn, size = node.grad_fn, _sizes(node.grad_fn)
        dim = getattr(grad_fn, "_saved_dim", None)
        if len(size) < 2 or dim is None or int(dim) % len(size) != 1:
            continue
        if hasattr(grad_fn, "_saved_split_sizes"):
            chunks = [int(s) for s in grad_fn._saved_split_sizes]
        elif hasattr(grad_fn, "_saved_split_size"):
            chunk = int(grad_fn._saved_split_size)
            chunks = [min(chunk, size[1] - start) for start in range(0, size[1], chunk)]
        else:
            continue
        if len(chunks) != len(node.outputs) or sum(chunks) != size[1]:
            continue
        offsets = [0]
        for c in chunks:
            offsets.append(offsets[-1] + c)
        node.module.split_sizes, node.module.offsets = chunks, offsets


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tuple[tp.DependencyGraph, set[object]]:
    """Torch-Pruning's dependency graph of ``model`` and the nodes of its channel shuffles.

    The steps of ``DependencyGraph.build_dependency`` (trace, dependencies, shapes, index
    mappings), with split sizes read from autograd and shuffles mapped before Torch-Pruning's own
    index mappings run.
    """
    graph = tp.DependencyGraph()
    graph.verbose = False
    graph.model = model
    graph._module2name = {module: name for name, module in model.named_modules()}
    graph.ignored_params = []
    graph._param_to_name, graph.unwrapped_parameters = graph._detect_unwrapped_parameters(None)
    graph.module2node = graph._trace(model, example_input, None, output_transform=None)
    graph._build_dependency(graph.module2node)
    shape_infer.init_shape_information(graph)
    _read_split_sizes(graph)
    shuffle_nodes = _map_shuffles(graph)
    for node in graph.module2node.values():
        if (update := _UPDATES.get(node.type)) is not None:
            update(graph, node)
    return graph, shuffle_nodes


#: Limits on Torch-Pruning's resolution of a model's groups (seconds, bytes of memory growth).
#: It normally takes well under a second per group; on some reshapes (Swin's window partition)
#: its index mappings grow without bound (18 GB in five minutes for Swin-T at 64x64).
TRACE_LIMITS = (120.0, 6 * 2**30)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@contextmanager
def trace_limits(what: str) -> Iterator[None]:
    """Stop ``what`` with :class:`UnsupportedModelError` once it passes :data:`TRACE_LIMITS`.

    Checked once a second from SIGALRM, so only on the main thread of a platform that has it
    (elsewhere the work runs unguarded)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    seconds, growth = TRACE_LIMITS
    start, start_bytes = time.monotonic(), _resident_bytes()

    def check(signum: int, frame: object) -> None:
        elapsed, grown = time.monotonic() - start, _resident_bytes() - start_bytes
        if elapsed > seconds or grown > growth:
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise UnsupportedModelError(
                f"Torch-Pruning's analysis of which channels depend on each other did not finish ({what}: "
                f"stopped after {elapsed:.0f} s and {grown / 2**30:.1f} GiB; the limits are {seconds:.0f} s and "
                f"{growth / 2**30:.0f} GiB). It happens when the forward pass reshapes channels into windows or "
                "spatial positions (Swin transformers); autoprune cannot prune this model."
            )

    previous = signal.signal(signal.SIGALRM, check)
    signal.setitimer(signal.ITIMER_REAL, 1.0, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
