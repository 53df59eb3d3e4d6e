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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import pruning
from ._cpu import cpu_model
from ._timing import (
    LatencyMeasurement,
    LatencySettings,
    _threads,
    _time_callable,
    measure_latency,
    measure_many,
    measure_relative,
    simd_round_to,
)
from .errors import ConfigError
from .profile import ModelProfile

__all__ = [
    "LatencySettings",
    "LatencyMeasurement",
    "measure_latency",
    "measure_many",
    "measure_relative",
    "simd_round_to",
    "LatencyPredictor",
    "build_predictor",
    "PredictorCheck",
    "save_predictor",
    "with_check",
]

_GRID_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)


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


def _resized_conv(module: nn.Module, call: pruning.CallRecord, cin: int, cout: int,
                  in_shape: list[int]) -> nn.Module:
    conv: nn.modules.conv._ConvNd = module  # type: ignore[assignment]
    depthwise = conv.groups == conv.in_channels and conv.groups > 1
    groups = cin if depthwise else conv.groups
    cout = cin if depthwise else cout
    in_shape[1] = cin
    return type(conv)(cin, cout, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, groups=groups, bias=conv.bias is not None)


def _resized_linear(module: nn.Module, call: pruning.CallRecord, cin: int, cout: int,
                    in_shape: list[int]) -> nn.Module:
    features = in_shape[-1]
    in_features = max(1, round(features * cin / max(1, call.sizes.get("attr.in_features", features))))
    in_shape[-1] = in_features
    return nn.Linear(in_features, cout, bias=module.bias is not None)


def _resized_norm(module: nn.Module, call: pruning.CallRecord, cin: int, cout: int,
                  in_shape: list[int]) -> nn.Module:
    in_shape[1] = cin
    return type(module)(cin)


#: How each layer type is rebuilt at other channel counts to be timed alone: ``resize(module,
#: call, cin, cout, in_shape)`` returns the layer and adjusts ``in_shape`` in place. Types not
#: listed are parameter-free (activations, pooling): only their input size changes. A new layer
#: kind (attention, a user's layer) is one entry here.
_RESIZERS: dict[type, Callable[[nn.Module, pruning.CallRecord, int, int, list[int]], nn.Module]] = {
    nn.modules.conv._ConvNd: _resized_conv,
    nn.Linear: _resized_linear,
    nn.modules.batchnorm._BatchNorm: _resized_norm,
}


def _standalone(call: pruning.CallRecord, module: nn.Module, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A fresh copy of ``module`` resized to ``cin``/``cout`` channels, and its input shape."""
    s = call.sizes
    in_shape = [s[f"in.{i}"] for i in range(sum(1 for k in s if k.startswith("in.")))]
    resize = next((fn for kind, fn in _RESIZERS.items() if isinstance(module, kind)), None)
    if resize is None:
        in_shape[1] = cin
        return module.eval(), tuple(in_shape)
    return resize(module, call, cin, cout, in_shape).eval(), tuple(in_shape)


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
    cpu = cpu_model()
    if cpu == "unknown":
        cpu = platform.processor() or platform.machine()
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
