"""What the CPU is: its model name and instruction-set flags, read once from /proc/cpuinfo."""

from __future__ import annotations

import functools

__all__ = ["cpu_flags", "cpu_model"]


@functools.cache
def _cpuinfo() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return tuple(f.readlines())
    except OSError:  # not Linux
        return ()


def _field(name: str) -> str | None:
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith(name)), None)


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (``avx2``, ``avx512f``, ``avx512_bf16``, ``amx_bf16``...)."""
    return frozenset((_field("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name, or ``"unknown"``."""
    return _field("model name") or "unknown"
