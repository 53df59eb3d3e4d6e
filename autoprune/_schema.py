"""Validation helpers shared by the pydantic models of search space files (:mod:`autoprune.space`)
and of tasks declared in them (:mod:`autoprune._declared`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Annotated, Any, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = ["show", "number_check", "Int", "Float", "OptionalInt", "Strict"]


def show(value: Any) -> str:
    """A value as a message shows it: YAML spellings for booleans and null, short reprs otherwise."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if value is None:
        return "null (an empty value)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def number_check(integer: bool, optional: bool = False) -> BeforeValidator:
    """Refuse what pydantic would coerce into a number: booleans, strings (``"3"``), non-finite floats."""
    kind = "an integer" if integer else "a number"

    def check(value: Any) -> Any:
        if value is None and optional:
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"must be {kind}{' or null' if optional else ''}, got {show(value)}")
        if not math.isfinite(float(value)):
            raise ValueError(f"must be a finite number, got {value}")
        if integer and not isinstance(value, numbers.Integral):
            if not float(value).is_integer():
                raise ValueError(f"must be a whole number, got {value}")
            return int(value)
        return int(value) if integer else float(value)

    return BeforeValidator(check)


Int = Annotated[int, number_check(integer=True)]
Float = Annotated[float, number_check(integer=False)]
OptionalInt = Annotated[Optional[int], number_check(integer=True, optional=True)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
