"""Numeric precision of training, fine-tuning, calibration and scoring.

``fp32`` everywhere, or ``bf16`` autocast (weights and optimizer state stay float32; matmuls and
convolutions run in bfloat16) with channels-last memory for convolutional models, on CUDA and on
CPUs that report bf16 instructions (AVX512-BF16, AMX). ``auto`` picks bf16 only where a few
timed training steps of the model itself run faster in it, since bf16 support alone does not
make a CPU faster: without AMX the gain depends on the layer shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ._cpu import cpu_flags, cpu_model
from ._workdir import exclusive_lock
from .errors import ConfigError

__all__ = ["PRECISIONS", "Precision", "bf16_supported", "resolve_precision", "autocast", "to_memory_format",
           "as_input", "measure_bf16_speedup"]

Precision = Literal["fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
#: ``auto`` takes bf16 when its training steps are at least this much faster than fp32's: clearly
#: faster, so that timing noise on a busy machine does not flip the choice.
AUTO_MIN_SPEEDUP = 1.3


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively (not emulated through float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return False


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_memory_format(model: nn.Module, precision: Precision) -> nn.Module:
    """``model`` in channels-last memory when bf16 runs its convolutions (oneDNN's fast layout)."""
    if precision == "bf16" and _has_conv(model):
        model.to(memory_format=torch.channels_last)
    return model


def as_input(x: torch.Tensor, precision: Precision) -> torch.Tensor:
    """A batch in the memory format :func:`to_memory_format` gave the model."""
    if precision == "bf16" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@contextmanager
def autocast(precision: Precision, device: torch.device | str = "cpu") -> Iterator[None]:
    """bf16 autocast on ``device`` when ``precision`` is bf16, otherwise nothing."""
    device = torch.device(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


def _step_seconds(model: nn.Module, x: torch.Tensor, precision: Precision, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train()
    to_memory_format(model, precision)
    x = as_input(x, precision)
    best = float("inf")
    for i in range(steps + 1):
        start = time.perf_counter()
        with autocast(precision, x.device):
            out = model(x)
        loss = out.float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:  # the first step warms oneDNN's kernel caches
            best = min(best, time.perf_counter() - start)
    return best


def measure_bf16_speedup(model: nn.Module, example_input: torch.Tensor, *, batch_size: int = 64,
                         steps: int = 3) -> float:
    """fp32 step time over bf16 step time, for training steps of a copy of ``model``.

    The copy's learning rate is 0, so ``model`` is untouched; ``example_input`` (1, ...) is
    repeated to ``batch_size``.
    """
    import copy

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = example_input.to(device).repeat(batch_size, *([1] * (example_input.dim() - 1)))
    x = torch.randn_like(x.float())
    fp32 = _step_seconds(copy.deepcopy(model), x, "fp32", steps)
    bf16 = _step_seconds(copy.deepcopy(model), x, "bf16", steps)
    return fp32 / bf16


def _auto_key(model: nn.Module, example_input: torch.Tensor, device: torch.device) -> str:
    parts = [device.type, cpu_model(), torch.__version__, type(model).__qualname__,
             str(sum(p.numel() for p in model.parameters())), "x".join(map(str, example_input.shape))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


_AUTO_CACHE: dict[str, Precision] = {}


def resolve_precision(precision: str, *, model: nn.Module | None = None,
                      example_input: torch.Tensor | None = None, device: torch.device | str = "cpu",
                      cache_dir: Path | None = None) -> Precision:
    """``fp32`` or ``bf16`` for a requested ``auto | fp32 | bf16`` on ``device``.

    ``bf16`` on a device without bf16 instructions is refused. ``auto`` times the model when the
    device has them, once: the decision is kept per process and, with ``cache_dir``, in a file
    there, so a resumed search and every worker of one make the same choice.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    device = torch.device(device)
    if precision == "fp32":
        return "fp32"
    if not bf16_supported(device):
        if precision == "bf16":
            raise ConfigError(
                f"precision 'bf16' needs a device with bfloat16 instructions (CUDA, or a CPU with AVX512-BF16 "
                f"or AMX); this {device.type} has none. Use precision 'auto' or 'fp32'."
            )
        return "fp32"
    if precision == "bf16":
        return "bf16"
    if model is None or example_input is None:
        return "fp32"
    key = _auto_key(model, example_input, device)
    if key in _AUTO_CACHE:
        return _AUTO_CACHE[key]
    path = cache_dir / f"precision-{key}.json" if cache_dir is not None else None
    with exclusive_lock(path.with_suffix(".lock")) if path is not None else contextlib.nullcontext():
        if path is not None and path.is_file():
            chosen = json.loads(path.read_text())["precision"]
        else:
            speedup = measure_bf16_speedup(model, example_input)
            chosen = "bf16" if speedup >= AUTO_MIN_SPEEDUP else "fp32"
            if path is not None:
                path.write_text(json.dumps({"precision": chosen, "bf16_speedup": round(speedup, 3),
                                            "model": type(model).__qualname__, "torch": torch.__version__}) + "\n")
    _AUTO_CACHE[key] = chosen
    return chosen
