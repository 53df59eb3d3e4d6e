"""Validation helpers shared by the pydantic models of search space files (:mod:`autoprune.space`)
and of tasks declared in them (:mod:`autoprune._declared`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
import typing
from typing import Annotated, Any, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

__all__ = ["show", "number_check", "Int", "Float", "OptionalInt", "Bool", "Strict", "format_error"]


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


def _bool_check(value: Any) -> Any:
    """Refuse what pydantic's lax mode would read as a boolean (``"yes"``, ``1``, ``"off"``): a
    file that says ``distill: 1`` most likely means something else than ``true``."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {show(value)}")
    return value


Bool = Annotated[bool, BeforeValidator(_bool_check)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def format_error(source: str, exc: ValidationError, *, root: type[BaseModel], flags: Mapping[str, str] | None = None,
                 union_tags: Mapping[str, tuple[str, ...]] | None = None) -> str:
    """One message for all of a file's validation errors: each as ``key 'a.b': what is wrong``, with
    the allowed keys of a mapping, the command-line option that set a key (``flags``), and without
    the union tags pydantic puts after a field (``union_tags``: field -> tag names)."""
    parts = []
    for err in exc.errors():
        loc = _without_tags(err["loc"], union_tags or {})
        key = ".".join(str(p) for p in loc) or "(top level)"
        label = f"key '{key}'" + (f" (option {flags[key]})" if flags and key in flags else "")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, loc[:-1])
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}" if allowed else "unknown key"
        elif err["type"] in ("model_type", "dict_type"):
            allowed = _allowed_keys(root, loc)
            msg = ("must be a mapping" + (f" of keys ({', '.join(allowed)})" if allowed else "")
                   + f", got {show(err.get('input'))}")
        elif err["type"] == "invalid_key":
            msg = f"keys must be strings, got {show(err.get('input'))}"
        elif err["type"] == "literal_error":
            msg = f"value {show(err.get('input'))} is not allowed; {msg[0].lower() + msg[1:]}"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif err["type"] != "missing" and "input" in err:
            msg = f"{msg} (got {show(err['input'])})"
        parts.append(f"{label}: {msg.rstrip('.')}")
    return f"{source} is not a valid search space: " + "; ".join(parts) + "."


def _without_tags(loc: tuple[Any, ...], union_tags: Mapping[str, tuple[str, ...]]) -> tuple[Any, ...]:
    """An error's location without the union tag pydantic puts after a tagged union field."""
    return loc[:1] + loc[2:] if len(loc) > 1 and loc[1] in union_tags.get(str(loc[0]), ()) else loc


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's type holds: ``LatencySpec | None`` -> LatencySpec, and so on
    through unions and Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _allowed_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model = root
    for part in loc:
        field = model.model_fields.get(str(part))
        found = _models_in(getattr(field, "annotation", None))
        if not found:
            return []
        model = found[0]
    return list(model.model_fields)
