"""Timing models on the target device: fixed batch and threads, warm-up, medians, round-robin.

CPU speed wanders on shared machines; every comparison here times its models in turn, several
rounds over, so drift hits all alike. :mod:`autoprune.latency` builds its predictor on this, and
:mod:`autoprune._onnx` times ONNX Runtime the same way.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ._cpu import cpu_flags
from .errors import ConfigError

if TYPE_CHECKING:
    from .latency import LatencyPredictor

__all__ = ["LatencySettings", "LatencyMeasurement", "measure_latency", "measure_many", "measure_relative",
           "round_robin", "batch_like", "simd_round_to"]


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured.

    Attributes:
        batch_size: images per forward pass.
        threads: torch intra-op threads while timing (fixed, so numbers are comparable).
        repeats: timed forward passes; the median is reported.
        warmup: untimed passes before timing (allocator, caches, lazy init).
        device: ``cpu`` or ``cuda``.
    """

    batch_size: int = 1
    threads: int = 1
    repeats: int = 30
    warmup: int = 5
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("batch_size", "threads", "repeats"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"latency.{name} must be >= 1, got {getattr(self, name)}.")
        if self.warmup < 0:
            raise ConfigError(f"latency.warmup must be >= 0, got {self.warmup}.")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"latency.device {self.device!r} is not allowed; use cpu or cuda.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("latency.device is cuda but no CUDA device is available here; use cpu.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LatencyMeasurement:
    """Median and spread of repeated forward passes, in milliseconds per batch."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    batch_size: int
    threads: int
    device: str

    @property
    def spread_ms(self) -> float:
        """p90 - p10: how much single runs vary."""
        return self.p90_ms - self.p10_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread_ms": self.spread_ms}


@contextmanager
def _threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_callable(fn: Any, x: Any, settings: LatencySettings) -> list[float]:
    """``settings.warmup`` untimed then ``settings.repeats`` timed calls of ``fn(x)``, in ms."""
    with torch.inference_mode():
        for _ in range(settings.warmup):
            fn(x)
        _sync(settings.device)
        times = []
        for _ in range(settings.repeats):
            start = time.perf_counter()
            fn(x)
            _sync(settings.device)
            times.append((time.perf_counter() - start) * 1000.0)
    return times


def _summary(times: Sequence[float], settings: LatencySettings) -> LatencyMeasurement:
    q = np.percentile(times, [10, 90])
    return LatencyMeasurement(
        median_ms=statistics.median(times), p10_ms=float(q[0]), p90_ms=float(q[1]), repeats=len(times),
        batch_size=settings.batch_size, threads=settings.threads, device=settings.device,
    )


def batch_like(example_input: torch.Tensor, settings: LatencySettings) -> torch.Tensor:
    """A batch of ``settings.batch_size`` shaped like ``example_input`` (whose batch dim is replaced)."""
    return example_input.expand(settings.batch_size, *example_input.shape[1:]).contiguous().to(settings.device)


@contextmanager
def _on_device(models: Sequence[nn.Module], device: str) -> Iterator[list[nn.Module]]:
    """The models in eval mode on ``device`` for timing, put back where and as they were after."""
    before = [(m.training, next((p.device for p in m.parameters()), None)) for m in models]
    try:
        yield [m.eval().to(torch.device(device)) for m in models]
    finally:
        for m, (training, place) in zip(models, before):
            m.train(training)
            if place is not None:
                m.to(place)


def measure_latency(
    model: nn.Module, example_input: torch.Tensor, settings: LatencySettings = LatencySettings()
) -> LatencyMeasurement:
    """Time ``model`` on a batch shaped like ``example_input`` (batch dim replaced by the setting).

    The model is left on its device and in its mode."""
    with _on_device([model], settings.device) as (timed,), _threads(settings.threads):
        return _summary(_time_callable(timed, batch_like(example_input, settings), settings), settings)


def round_robin(fns: Sequence[Any], x: Any, settings: LatencySettings, rounds: int) -> list[LatencyMeasurement]:
    """Time every callable in turn, ``rounds`` times over, so the machine's speed drift hits all alike."""
    per_round = max(1, math.ceil(settings.repeats / rounds))
    chunk = replace(settings, repeats=per_round)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for i, fn in enumerate(fns):
            times[i] += _time_callable(fn, x, chunk if r == 0 else replace(chunk, warmup=1))
    return [_summary(t, settings) for t in times]


def measure_many(
    models: Sequence[nn.Module], example_input: torch.Tensor, settings: LatencySettings = LatencySettings(),
    *, rounds: int = 5,
) -> list[LatencyMeasurement]:
    """Time several models round-robin, so that drift of the machine's speed hits all alike.

    A CPU's speed wanders by tens of percent over seconds (frequency scaling, neighbours on a
    shared host); timing model A fully and then model B turns that drift into a fake speedup.
    Each of ``rounds`` rounds runs every model ``repeats / rounds`` times; each model's median
    and spread are over all its runs.
    """
    with _on_device(models, settings.device) as prepared, _threads(settings.threads):
        return round_robin(prepared, batch_like(example_input, settings), settings, rounds)


def measure_relative(models: Sequence[nn.Module], dense: nn.Module, example_input: torch.Tensor,
                     predictor: LatencyPredictor) -> list[float]:
    """Each model's median latency in ms, timed round-robin with ``dense`` and expressed in the
    dense latency ``predictor`` was calibrated on (``pruned / dense_now * predictor.dense_ms``), so
    the machine's momentary speed does not decide whether a plan meets a latency budget."""
    dense_now, *measured = measure_many([dense, *models], example_input, predictor.settings)
    return [m.median_ms * predictor.dense_ms / dense_now.median_ms for m in measured]


def simd_round_to(device: str = "cpu") -> int:
    """The channel multiple that fills the device's float32 vector lanes: a ``round_to`` for fast plans.

    oneDNN and ONNX Runtime pad channels to whole SIMD registers, so on an AVX-512 CPU a layer
    cut from 16 to 11 channels still computes 16: MACs fall, time does not. 16 for AVX-512, 8
    for AVX/AVX2 and for CUDA (tensor cores), 4 otherwise (SSE, NEON).
    """
    if device == "cuda":
        return 8
    flags = cpu_flags()
    if "avx512f" in flags:
        return 16
    if "avx2" in flags or "avx" in flags:
        return 8
    return 4
