"""Measured latency on the target device, and a lookup-table predictor for candidates.

MACs are a proxy; users deploy against milliseconds. :func:`measure_latency` times a model with a
fixed batch size and thread count (warm-up, then the median of repeated runs, with its spread).
:class:`LatencyPredictor` follows NetAdapt and HALP: every layer call of the model is timed once,
standalone, at a grid of input/output channel counts; a candidate's latency is the interpolated
sum over its layers, calibrated against a few fully measured pruned models. The table is cached
per device, model structure and settings, so a search never times candidates from scratch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import pruning
from .errors import ConfigError
from .profile import ModelProfile

__all__ = [
    "LatencySettings",
    "LatencyMeasurement",
    "measure_latency",
    "measure_many",
    "measure_onnx_many",
    "simd_round_to",
    "LatencyPredictor",
    "build_predictor",
    "PredictorCheck",
    "save_predictor",
    "with_check",
]

_GRID_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)


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


def _batch(example_input: torch.Tensor, settings: LatencySettings) -> torch.Tensor:
    """A batch of ``settings.batch_size`` shaped like ``example_input`` (whose batch dim is replaced)."""
    return example_input.expand(settings.batch_size, *example_input.shape[1:]).contiguous().to(settings.device)


def measure_latency(
    model: nn.Module, example_input: torch.Tensor, settings: LatencySettings = LatencySettings()
) -> LatencyMeasurement:
    """Time ``model`` on a batch shaped like ``example_input`` (batch dim replaced by the setting)."""
    model = model.eval().to(torch.device(settings.device))
    with _threads(settings.threads):
        return _summary(_time_callable(model, _batch(example_input, settings), settings), settings)


def _round_robin(fns: Sequence[Any], x: Any, settings: LatencySettings, rounds: int) -> list[LatencyMeasurement]:
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
    device = torch.device(settings.device)
    prepared = [m.eval().to(device) for m in models]
    with _threads(settings.threads):
        return _round_robin(prepared, _batch(example_input, settings), settings, rounds)


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
    return _round_robin(runners, _batch(example_input, settings).numpy(), settings, rounds)


def simd_round_to(device: str = "cpu") -> int:
    """The channel multiple that fills the device's float32 vector lanes: a ``round_to`` for fast plans.

    oneDNN and ONNX Runtime pad channels to whole SIMD registers, so on an AVX-512 CPU a layer
    cut from 16 to 11 channels still computes 16: MACs fall, time does not. 16 for AVX-512, 8
    for AVX/AVX2 and for CUDA (tensor cores), 4 otherwise (SSE, NEON).
    """
    if device == "cuda":
        return 8
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "avx512f" in flags:
        return 16
    if "avx2" in flags or "avx" in flags:
        return 8
    return 4


# ----------------------------------------------------------------------------------------------
# Lookup-table predictor


@dataclass(frozen=True)
class _Layer:
    """A standalone-timeable layer call and how its channel counts follow the groups."""

    key: str  # signature shared by identical layers (timed once)
    in_group: int  # group index governing input channels, -1 if fixed
    out_group: int
    in_dense: int
    out_dense: int
    in_grid: tuple[int, ...]
    out_grid: tuple[int, ...]


@dataclass(frozen=True)
class PredictorCheck:
    """Predicted against measured latency on sampled plans.

    ``measured_ms`` are rescaled by how much the dense model's latency drifted since the
    predictor was calibrated (both timed in the same round-robin), so the check compares like
    with like on a machine whose speed wanders.
    """

    predicted_ms: tuple[float, ...]
    measured_ms: tuple[float, ...]

    @property
    def relative_errors(self) -> list[float]:
        return [abs(p - m) / m for p, m in zip(self.predicted_ms, self.measured_ms)]

    @property
    def median_abs_error(self) -> float:
        return float(statistics.median(self.relative_errors)) if self.measured_ms else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"predicted_ms": list(self.predicted_ms), "measured_ms": list(self.measured_ms),
                "median_abs_relative_error": self.median_abs_error, "max_abs_relative_error":
                max(self.relative_errors) if self.measured_ms else None}


@dataclass(frozen=True, eq=False)
class LatencyPredictor:
    """Predicts a plan's latency in ms per batch from per-layer tables.

    ``predict(kept)`` sums each layer's bilinearly interpolated time at its kept input/output
    channels, then applies ``scale * sum + offset`` fitted on fully measured models (the layers
    timed alone miss functional ops such as residual adds and Python overhead).

    The table's grid includes multiples of ``block`` (the device's SIMD width, see
    :func:`simd_round_to`), so plans rounded to it are read off measured points instead of being
    interpolated between unaligned neighbours, which the kernels run less efficiently.
    """

    names: tuple[str, ...]
    dense_channels: tuple[int, ...]
    layers: tuple[_Layer, ...]
    tables: Mapping[str, np.ndarray]  # key -> (len(in_grid), len(out_grid)) ms
    scale: float
    offset: float
    dense_ms: float  # measured latency of the dense model
    settings: LatencySettings
    check: PredictorCheck | None = field(default=None)
    block: int = 1  # the table's grid includes multiples of this

    def _raw(self, kept: np.ndarray) -> float:
        total = 0.0
        for layer in self.layers:
            table = self.tables[layer.key]
            cin = kept[layer.in_group] * layer.in_dense / self.dense_channels[layer.in_group] if layer.in_group >= 0 else layer.in_dense
            cout = kept[layer.out_group] * layer.out_dense / self.dense_channels[layer.out_group] if layer.out_group >= 0 else layer.out_dense
            total += _bilinear(table, layer.in_grid, layer.out_grid, cin, cout)
        return total

    def predict_kept(self, kept: np.ndarray) -> float:
        """Latency (ms per batch) for kept channels per group, shape (G,), in profile order."""
        return self.scale * self._raw(np.asarray(kept, dtype=np.float64)) + self.offset

    def predict(self, kept: Mapping[str, int]) -> float:
        vector = np.array([kept.get(n, c) for n, c in zip(self.names, self.dense_channels)], dtype=np.float64)
        return self.predict_kept(vector)

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names), "dense_channels": list(self.dense_channels),
            "layers": [asdict(layer) for layer in self.layers],
            "tables": {k: v.tolist() for k, v in self.tables.items()},
            "scale": self.scale, "offset": self.offset, "dense_ms": self.dense_ms,
            "settings": self.settings.to_dict(), "check": None if self.check is None else self.check.to_dict(),
            "block": self.block,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyPredictor:
        check = data.get("check")
        return cls(
            names=tuple(data["names"]), dense_channels=tuple(data["dense_channels"]),
            layers=tuple(_Layer(**{**layer, "in_grid": tuple(layer["in_grid"]), "out_grid": tuple(layer["out_grid"])})
                         for layer in data["layers"]),
            tables={k: np.array(v) for k, v in data["tables"].items()},
            scale=float(data["scale"]), offset=float(data["offset"]), dense_ms=float(data["dense_ms"]),
            settings=LatencySettings(**data["settings"]),
            check=None if check is None else PredictorCheck(tuple(check["predicted_ms"]), tuple(check["measured_ms"])),
            block=int(data.get("block", 1)),
        )


def _bilinear(table: np.ndarray, xs: Sequence[int], ys: Sequence[int], x: float, y: float) -> float:
    def locate(grid: Sequence[int], v: float) -> tuple[int, int, float]:
        if len(grid) == 1:
            return 0, 0, 0.0
        v = min(max(v, grid[0]), grid[-1])
        j = int(np.searchsorted(grid, v, side="right")) - 1
        j = min(max(j, 0), len(grid) - 2)
        t = (v - grid[j]) / (grid[j + 1] - grid[j])
        return j, j + 1, t

    i0, i1, tx = locate(xs, x)
    j0, j1, ty = locate(ys, y)
    top = table[i0, j0] * (1 - ty) + table[i0, j1] * ty
    bottom = table[i1, j0] * (1 - ty) + table[i1, j1] * ty
    return float(top * (1 - tx) + bottom * tx)


def _grid(dense: int, block: int = 1) -> tuple[int, ...]:
    """Channel counts to time a layer at: fractions of ``dense``, each also rounded up to a multiple of ``block``.

    Both, because in eager PyTorch fewer channels still save time below a block, while aligned
    counts run faster per channel than their unaligned neighbours.
    """
    points = {max(1, round(dense * f)) for f in _GRID_FRACTIONS}
    if block > 1:
        points |= {min(dense, math.ceil(p / block) * block) for p in points}
    return tuple(sorted(points))


def _standalone(call: pruning.CallRecord, module: nn.Module, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A fresh copy of ``module`` resized to ``cin``/``cout`` channels, and its input shape."""
    s = call.sizes
    in_shape = [s[f"in.{i}"] for i in range(sum(1 for k in s if k.startswith("in.")))]
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups == module.in_channels and module.groups > 1
        groups = cin if depthwise else module.groups
        cout = cin if depthwise else cout
        layer = type(module)(cin, cout, module.kernel_size, stride=module.stride, padding=module.padding,
                             dilation=module.dilation, groups=groups, bias=module.bias is not None)
        in_shape[1] = cin
    elif isinstance(module, nn.Linear):
        features = in_shape[-1]
        in_features = max(1, round(features * cin / max(1, call.sizes.get("attr.in_features", features))))
        layer = nn.Linear(in_features, cout, bias=module.bias is not None)
        in_shape[-1] = in_features
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        layer = type(module)(cin)
        in_shape[1] = cin
    else:
        layer = module  # parameter-free (activation, pooling): only the input size changes
        in_shape[1] = cin
    return layer.eval(), tuple(in_shape)


def _signature(call: pruning.CallRecord, module: nn.Module, grid_in: tuple[int, ...], grid_out: tuple[int, ...]) -> str:
    text = json.dumps([type(module).__name__, repr(module), sorted(call.sizes.items()), grid_in, grid_out])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _channel_groups(profile: ModelProfile, n_calls: int) -> list[tuple[int, int, int, int]]:
    """(in group, out group, dense in, dense out) per traced call, read off the cost model slopes."""
    cost = profile.cost
    keys = _quantity_keys(profile)
    result = []
    for i in range(n_calls):
        def governing(name: str) -> tuple[int, int]:
            j = keys.get(("call", i, name))
            if j is None:
                return -1, 0
            nonzero = np.flatnonzero(cost.slopes[j])
            return (int(nonzero[0]) if nonzero.size else -1), int(cost.base[j])

        gi, cin = governing("in.1")
        go, cout = governing("out.1")
        result.append((gi, go, cin, cout))
    return result


def _quantity_keys(profile: ModelProfile) -> dict[tuple[Any, ...], int]:
    return {key: j for j, key in enumerate(profile.cost.keys)}


def _cache_path(cache_dir: Path, profile: ModelProfile, settings: LatencySettings, block: int) -> Path:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    device = torch.cuda.get_device_name() if settings.device == "cuda" else cpu
    # Caches before the block existed hold unaligned grids, so the key changes with it.
    key = json.dumps([profile.fingerprint, list(profile.input_shape), settings.to_dict(), device, torch.__version__,
                      {"block": block}])
    return cache_dir / f"latency-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def build_predictor(
    model: nn.Module,
    example_input: torch.Tensor,
    profile: ModelProfile,
    settings: LatencySettings = LatencySettings(),
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    calibration_plans: Sequence[Mapping[str, int]] = (),
    check_plans: Sequence[Mapping[str, int]] = (),
    block: int | None = None,
) -> LatencyPredictor:
    """Measure (or load from ``cache_dir``) the per-layer latency tables of ``model``.

    ``block``: the grid includes multiples of it near each grid fraction (default: :func:`simd_round_to`).

    ``calibration_plans`` (kept channels per group) are measured whole to fit the scale/offset
    correction, together with the dense model; by default uniform cuts to 75%, 50% and 25%.
    ``check_plans`` are measured whole afterwards and stored as the predictor's :class:`PredictorCheck`.
    """
    block = simd_round_to(settings.device) if block is None else block
    if block < 1:
        raise ConfigError(f"block must be a positive number of channels, got {block}.")
    path = _cache_path(Path(cache_dir), profile, settings, block) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return LatencyPredictor.from_dict(json.loads(path.read_text()))
        except (KeyError, ValueError, TypeError):
            pass  # stale or corrupt cache: measure again
    model = model.eval()
    calls, _ = pruning.trace_calls(model, example_input)
    modules = dict(model.named_modules())
    channel_groups = _channel_groups(profile, len(calls))
    device = torch.device(settings.device)
    layers: list[_Layer] = []
    tables: dict[str, np.ndarray] = {}
    with _threads(settings.threads):
        for call, (gi, go, cin, cout) in zip(calls, channel_groups):
            module = modules[call.module]
            if call.kind not in ("conv", "linear", "norm", "activation", "pool") or cin <= 0:
                continue
            depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.in_channels and module.groups > 1
            elementwise = call.kind in ("norm", "activation", "pool")
            grid_in = _grid(cin, block) if gi >= 0 else (cin,)
            grid_out = (1,) if (elementwise or depthwise) else (_grid(cout, block) if go >= 0 else (cout,))
            key = _signature(call, module, grid_in, grid_out)
            if key not in tables:
                table = np.zeros((len(grid_in), len(grid_out)))
                for a, ci in enumerate(grid_in):
                    for b, co in enumerate(grid_out):
                        layer, shape = _standalone(call, module, ci, co)
                        layer = layer.to(device)
                        x = torch.randn(settings.batch_size, *shape[1:], device=device)
                        quick = LatencySettings(batch_size=settings.batch_size, threads=settings.threads,
                                                repeats=max(5, settings.repeats // 3), warmup=2, device=settings.device)
                        table[a, b] = statistics.median(_time_callable(layer, x, quick))
                # Fewer channels never cost more; noise can say otherwise, so make each axis monotone.
                table = np.maximum.accumulate(np.maximum.accumulate(table, axis=0), axis=1)
                tables[key] = table
            layers.append(_Layer(key=key, in_group=gi,
                                 out_group=-1 if (elementwise or depthwise) else go, in_dense=cin,
                                 out_dense=1 if (elementwise or depthwise) else cout,
                                 in_grid=grid_in, out_grid=grid_out))
    names = tuple(profile.names)
    dense_channels = tuple(g.channels for g in profile.groups)
    draft = LatencyPredictor(names, dense_channels, tuple(layers), tables, 1.0, 0.0, 0.0, settings, block=block)
    if not calibration_plans:
        calibration_plans = [
            {g.name: max(1, round(g.channels * f)) for g in profile.groups} for f in (0.75, 0.5, 0.25)
        ]
    plans = [{}, *calibration_plans]
    models = [pruning.prune_copy(model, example_input, kept) if kept else model for kept in plans]
    measured = [m.median_ms for m in measure_many(models, example_input, settings)]
    raw = [draft._raw(np.array([kept.get(n, c) for n, c in zip(names, dense_channels)], dtype=np.float64))
           for kept in plans]
    scale, offset = np.polyfit(raw, measured, 1) if len(set(raw)) > 1 else (measured[0] / raw[0], 0.0)
    if scale <= 0:
        scale, offset = float(np.mean(measured) / np.mean(raw)), 0.0
    predictor = replace(draft, scale=float(scale), offset=float(offset), dense_ms=measured[0])
    if check_plans:
        predictor = with_check(predictor, model, example_input, check_plans)
    if cache_dir is not None:
        save_predictor(predictor, Path(cache_dir), profile)
    return predictor


def save_predictor(predictor: LatencyPredictor, cache_dir: Path, profile: ModelProfile) -> Path:
    """Write the predictor where :func:`build_predictor` finds it again (atomically)."""
    path = _cache_path(cache_dir, profile, predictor.settings, predictor.block)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(predictor.to_dict()))
    os.replace(tmp, path)
    return path


def with_check(
    predictor: LatencyPredictor, model: nn.Module, example_input: torch.Tensor, plans: Sequence[Mapping[str, int]]
) -> LatencyPredictor:
    """The predictor with its error measured on ``plans`` (kept channels per group)."""
    models = [pruning.prune_copy(model, example_input, kept) for kept in plans]
    # The dense model is timed alongside so the check is relative to the same machine state.
    dense, *pruned = measure_many([model, *models], example_input, predictor.settings)
    drift = dense.median_ms / predictor.dense_ms
    measured = [m.median_ms / drift for m in pruned]
    predicted = [predictor.predict(kept) for kept in plans]
    return replace(predictor, check=PredictorCheck(tuple(predicted), tuple(measured)))
