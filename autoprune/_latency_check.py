"""What a latency search measured of its best plans after the trials, and how that is told.

Trials are ranked by *predicted* latency; after the search the best of them are timed for real,
one at a time, and the first within the budget (plus a tolerance for timing noise) becomes the
search's answer. :class:`LatencyCheck` records that check so the summary, the plots and the export
report state the same facts: the limit, the dense model's latency, the chosen plan's, and whether
the budget was met. A miss is never silent: :meth:`LatencyCheck.miss` is the warning they show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["MeasuredTrial", "LatencyCheck", "LatencyBudgetWarning", "percent", "relative_to_limit", "budget_verdict"]


class LatencyBudgetWarning(UserWarning):
    """A latency search's prediction and measurement disagree, or no top plan measures within budget."""


def percent(fraction: float) -> str:
    """``0.053`` as ``5.3%``: one decimal, so a 5.3% miss never reads as a 5% tolerance."""
    return f"{fraction:.1%}"


def relative_to_limit(ms: float, limit_ms: float) -> str:
    """How ``ms`` stands to ``limit_ms`` in words: ``3.2% over the limit`` or ``0.9% under it``."""
    excess = ms / limit_ms - 1
    return f"{percent(excess)} over the limit" if excess > 0 else f"{percent(-excess)} under the limit"


def budget_verdict(ms: float, limit_ms: float, tolerance: float) -> str:
    """``ms`` against a latency limit, in words: met, met within the timing tolerance, or missed."""
    if ms <= limit_ms:
        return f"budget met ({relative_to_limit(ms, limit_ms)})"
    if ms <= limit_ms * (1 + tolerance):
        return f"budget met within the {percent(tolerance)} timing tolerance ({relative_to_limit(ms, limit_ms)})"
    return f"BUDGET MISSED ({relative_to_limit(ms, limit_ms)}, tolerance {percent(tolerance)})"


@dataclass(frozen=True)
class MeasuredTrial:
    """One of the best trials, timed after the search (ms per batch of the search's latency settings)."""

    number: int
    val_score: float
    predicted_ms: float
    measured_ms: float


@dataclass(frozen=True)
class LatencyCheck:
    """The after-search timing of a latency search's best trials.

    Attributes:
        budget: the budget as given (``latency=0.7`` or ``latency_ms=3``); empty when trials were
            timed for a ``latency:`` section under a MACs or params budget.
        limit_ms: the budget in ms per batch (None without a latency budget).
        tolerance: the relative timing noise allowed above ``limit_ms``.
        dense_ms: the dense model's measured latency.
        timing: how it was timed, in words (batch, threads, device).
        measured: the trials timed, best validation score first, as far as the check went.
        chosen: the first of them within ``limit_ms * (1 + tolerance)``; None when none was.
    """

    budget: str
    limit_ms: float | None
    tolerance: float
    dense_ms: float
    timing: str
    measured: tuple[MeasuredTrial, ...]
    chosen: int | None

    @property
    def met(self) -> bool:
        """Whether a measured plan meets the budget (always, without a latency budget)."""
        return self.limit_ms is None or self.chosen is not None

    @property
    def best_by_score(self) -> MeasuredTrial | None:
        return self.measured[0] if self.measured else None

    @property
    def chosen_trial(self) -> MeasuredTrial | None:
        return next((t for t in self.measured if t.number == self.chosen), None)

    @property
    def handed_on(self) -> MeasuredTrial | None:
        """The trial the search hands to export: the chosen one, else the best by validation score."""
        return self.chosen_trial if self.chosen is not None else self.best_by_score

    @property
    def passed_over(self) -> tuple[MeasuredTrial, ...]:
        """Trials ranked above the chosen one (by val score, then MACs) that measured over budget."""
        numbers = [t.number for t in self.measured]
        # measured is in rank order: the trials before the chosen one were timed and missed
        return self.measured[: numbers.index(self.chosen)] if self.chosen in numbers else ()

    def lines(self) -> list[str]:
        """What the search summary and the export report say about it, one fact a line."""
        lines = []
        if self.limit_ms is not None:
            lines.append(f"latency budget {self.budget}: limit {self.limit_ms:.3f} ms per batch = "
                         f"{self.limit_ms / self.dense_ms:.3f} of the dense model's measured {self.dense_ms:.3f} ms "
                         f"({self.timing}); timing tolerance {percent(self.tolerance)}")
        else:
            lines.append(f"latency (not budgeted): dense model measured {self.dense_ms:.3f} ms per batch ({self.timing})")
        for t in self.passed_over if self.limit_ms is not None else ():
            lines.append(f"trial {t.number} ranks higher (val score {t.val_score:.4f}) but measured {t.measured_ms:.3f} ms "
                         f"(predicted {t.predicted_ms:.3f} ms), {relative_to_limit(t.measured_ms, self.limit_ms)}: "
                         f"passed over for trial {self.chosen}")
        handed = self.handed_on
        if handed is not None:
            which = "chosen plan" if self.chosen is not None else "plan handed on (highest val score)"
            verdict = (f": {budget_verdict(handed.measured_ms, self.limit_ms, self.tolerance)}"
                       if self.limit_ms is not None else "")
            lines.append(f"{which}, trial {handed.number}: measured {handed.measured_ms:.3f} ms = "
                         f"{handed.measured_ms / self.dense_ms:.3f} of dense (predicted {handed.predicted_ms:.3f} ms)"
                         f"{verdict}")
        return lines

    def miss(self) -> str | None:
        """The warning to show when no measured plan meets the budget; None when one does."""
        if self.met or self.limit_ms is None:
            return None
        fastest = min(self.measured, key=lambda t: t.measured_ms, default=None)
        handed = self.handed_on
        text = (f"latency budget {self.budget} MISSED: none of the {len(self.measured)} best trials measures within "
                f"{self.limit_ms:.3f} ms + {percent(self.tolerance)} tolerance")
        if handed is not None:
            text += (f"; the plan handed on, trial {handed.number}, measured {handed.measured_ms:.3f} ms, "
                     f"{relative_to_limit(handed.measured_ms, self.limit_ms)}")
        if fastest is not None and fastest is not handed:
            text += (f"; the fastest measured, trial {fastest.number}, {fastest.measured_ms:.3f} ms, "
                     f"{relative_to_limit(fastest.measured_ms, self.limit_ms)}")
        return text + (". The latency predictor underestimates this device; relax the budget or search with more "
                       "trials before relying on this plan.")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["met"] = self.met
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyCheck:
        measured: Sequence[Mapping[str, Any]] = data.get("measured") or ()
        return cls(budget=str(data["budget"]), limit_ms=data.get("limit_ms"), tolerance=float(data["tolerance"]),
                   dense_ms=float(data["dense_ms"]), timing=str(data.get("timing", "")),
                   measured=tuple(MeasuredTrial(**m) for m in measured), chosen=data.get("chosen"))
