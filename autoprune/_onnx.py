"""ONNX: writing a model as ONNX, checking it under ONNX Runtime, and timing it there.

The only module that imports onnx and onnxruntime (both optional: ``pip install 'autoprune[onnx]'``).
ONNX Runtime is how most CPU deployments run a model, and it computes channels in SIMD-wide blocks,
so its latency is the one a pruned model's speedup should be judged by.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, short
from ._timing import LatencyMeasurement, LatencySettings, batch_like, round_robin

__all__ = ["batch_dim", "write_onnx", "check_onnx", "measure_onnx_many", "onnx_runtime_latency"]

#: Models with more weight bytes than this are written as model.onnx + model.onnx.data.
ONNX_SINGLE_FILE_BYTES = 1 << 30


def batch_dim() -> Any:
    """The dynamic batch dimension of every exported model (torch.export and ONNX): any batch size
    at deployment. Made on use: ``torch.export`` imports sympy, ~0.5 s that commands exporting
    nothing should not pay."""
    return torch.export.Dim("batch", min=1, max=65536)


def write_onnx(model: nn.Module, batch: torch.Tensor, path: Path) -> None:
    """Write ``model`` as ONNX with a dynamic batch dimension (input ``input``, output ``output``).

    Raises ImportError without the ``onnx`` extra.
    """
    import onnx  # noqa: F401  (torch.onnx needs it)

    # One self-contained file unless the weights come near protobuf's 2 GiB limit; then they go to
    # model.onnx.data beside it, which must travel with it.
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    torch.onnx.export(model.eval(), (batch,), str(path), input_names=["input"], output_names=["output"],
                      dynamo=True, verbose=False, dynamic_shapes=({0: batch_dim()},),
                      external_data=weight_bytes > ONNX_SINGLE_FILE_BYTES)


def check_onnx(path: Path, batch: torch.Tensor, expected: torch.Tensor, *, atol: float) -> dict[str, Any]:
    """Run the ONNX file on ``batch`` under ONNX Runtime and compare with PyTorch's ``expected``:
    ``max_abs_diff`` and ``matches`` (within ``atol``), or why it could not be compared."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"check": "onnxruntime is not installed; outputs not compared"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    diff = float(np.abs(got - expected.numpy()).max())
    return {"max_abs_diff": diff, "matches": diff <= atol}


def measure_onnx_many(
    paths: Sequence[str | os.PathLike[str]], example_input: torch.Tensor,
    settings: LatencySettings = LatencySettings(), *, rounds: int = 5,
) -> list[LatencyMeasurement]:
    """Time ONNX models under ONNX Runtime's CPU provider, round-robin like :func:`measure_many`.

    ONNX Runtime fuses BatchNorm and activations into the convolutions and packs channels into
    SIMD-wide blocks, so this is the latency a CPU deployment sees. ``settings.threads`` sets
    the intra-op threads. Raises :class:`ConfigError` without onnxruntime or for a CUDA setting.
    """
    if settings.device != "cpu":
        raise ConfigError("ONNX Runtime latency is measured on the CPU only; use latency.device cpu.")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnxruntime is not installed; pip install 'autoprune[onnx]'.") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads
    options.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
    runners = [(lambda x, s=s, name=s.get_inputs()[0].name: s.run(None, {name: x})) for s in sessions]
    return round_robin(runners, batch_like(example_input, settings).numpy(), settings, rounds)


def onnx_runtime_latency(dense: nn.Module, pruned_onnx: Path, example_input: torch.Tensor,
                         settings: LatencySettings) -> dict[str, float] | dict[str, str]:
    """Dense and pruned latency under ONNX Runtime, timed round-robin, or why it was not measured."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {"error": "onnxruntime is not installed (pip install 'autoprune[onnx]')"}
    if settings.device != "cpu":
        return {"error": "ONNX Runtime latency is measured on the CPU only"}
    with tempfile.TemporaryDirectory(prefix="autoprune-dense-onnx-") as tmp:
        dense_onnx = Path(tmp) / "dense.onnx"
        try:
            write_onnx(dense, torch.randn(2, *example_input.shape[1:]), dense_onnx)
        except Exception as exc:
            return {"error": f"the dense model could not be exported: {type(exc).__name__}: {short(exc)}"}
        dense_ms, pruned_ms = (m.median_ms for m in measure_onnx_many([dense_onnx, pruned_onnx], example_input, settings))
    return {"dense_ms": dense_ms, "pruned_ms": pruned_ms, "speedup": dense_ms / pruned_ms}
