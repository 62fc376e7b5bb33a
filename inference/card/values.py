"""Value types shared by the card files (model.py, drift.py, segmenter.py): constrained scalars, the
`card_value` decorator (frozen pydantic dataclasses whose constructors raise `ModelCardError`) and `explain`,
which turns pydantic's errors into one message naming each key path.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Annotated, Any, TypeVar, dataclass_transform, get_args

import pydantic.dataclasses
from annotated_types import Gt
from pydantic import (
    AfterValidator,
    AllowInfNan,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    model_validator,
)

from dicom_fusion.inference.errors import ModelCardError

# --------------------------------------------------------------------------- value types

Text = Annotated[str, StringConstraints(strict=True, pattern=r"\S")]
"""A string with at least one non-blank character."""
PositiveInt = Annotated[int, Strict(), Gt(0)]
"""An integer > 0; `true` and 2.0 are refused rather than read as 1 and 2."""
Finite = Annotated[float, Strict(), AllowInfNan(False)]
"""A finite number; integers are accepted and become floats, strings and booleans are refused."""


def _sha256(value: str) -> str:
    sha = value.lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelCardError(f"sha256 must be 64 hex digits (the digest of the weights file), got {value!r}")
    return sha


Sha256 = Annotated[str, Strict(), AfterValidator(_sha256)]

_C = TypeVar("_C", bound=type)


@dataclass_transform(frozen_default=True, field_specifiers=(Field, dataclasses.field))
def card_value(cls: _C) -> _C:
    """Make `cls` a frozen pydantic dataclass whose unknown keys are errors (a typo like `treshold` must
    not silently fall back to a default) and whose constructor raises `ModelCardError`."""
    cls = pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
    validate = cls.__init__

    @functools.wraps(validate)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            validate(self, *args, **kwargs)
        except ValidationError as exc:
            raise ModelCardError(explain(exc, cls, f"{cls.__name__}()")) from None

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


def omitted_is_none(*names: str) -> Any:
    """A before-validator for optional fields that have no default (they precede required ones): TOML has
    no null, so an omitted key means None."""

    def fill(cls: type, data: Any) -> Any:
        return {**dict.fromkeys(names), **data} if isinstance(data, dict) else data

    return model_validator(mode="before")(classmethod(fill))  # type: ignore[arg-type]


# ------------------------------------------------------------------------- pydantic errors as ModelCardError

_EXPECTED = {
    "bool_type": "true or false",
    "int_type": "a positive integer",
    "greater_than": "a positive integer",
    "float_type": "a finite number",
    "finite_number": "a finite number",
    "string_type": "a non-empty string",
    "string_pattern_mismatch": "a non-empty string",
    "tuple_type": "a list",
    "dict_type": "a table",
    "dataclass_type": "a table",
    "dataclass_args_type": "a table",
    "path_type": "a path",
}
"""What a value must be, by pydantic error type; the types above only use these constraints."""


def _key_path(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _types_in(annotation: Any) -> Iterator[Any]:
    yield annotation
    for arg in get_args(annotation):
        yield from _types_in(arg)


def _allowed(cls: type, loc: tuple[int | str, ...]) -> str:
    """The keys the table at `loc` of card type `cls` may hold."""
    table: Any = cls
    for part in loc:
        if isinstance(part, str):
            annotation = table.__pydantic_fields__[part].annotation
            table = next(t for t in _types_in(annotation)
                         if isinstance(t, type) and pydantic.dataclasses.is_pydantic_dataclass(t))
    return ", ".join(sorted(set(table.__pydantic_fields__) - {"path"}))


def explain(exc: ValidationError, cls: type, top: str = "the top level") -> str:
    """One message for all of pydantic's errors, each naming its key path (`timeline.features[2].std`)."""
    messages: list[str] = []
    unknown: dict[tuple[int | str, ...], list[str]] = {}
    for error in exc.errors():
        loc, kind, got = error["loc"], error["type"], error.get("input")
        names = list(cls.__pydantic_fields__)  # type: ignore[attr-defined]
        if loc and isinstance(loc[0], int) and loc[0] < len(names):  # a positional constructor argument
            loc = (names[loc[0]], *loc[1:])
        where = _key_path(loc) or top
        if kind in ("value_error", "assertion_error"):
            messages.append(str(error["ctx"]["error"]))  # a validator's own message names the key
        elif kind in ("unexpected_keyword_argument", "extra_forbidden"):
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
        elif kind == "missing" and loc and isinstance(loc[-1], int):
            messages.append(f"{_key_path(loc[:-1])} has too few entries")
        elif kind == "missing":
            messages.append(f"missing key {where}")
        elif kind == "literal_error":
            messages.append(f"{where} {got!r} is unknown; use one of {error['ctx']['expected']}")
        elif kind in ("too_short", "too_long"):
            length = error["ctx"].get("max_length", error["ctx"].get("min_length"))
            messages.append(f"{where} must have {length} entries, got {got!r}")
        elif kind in _EXPECTED:
            messages.append(f"{where} must be {_EXPECTED[kind]}, got {got!r}")
        else:
            messages.append(f"{where}: {error['msg']}")
    for parent, keys in unknown.items():
        messages.append(f"unknown key(s) in {_key_path(parent) or top}: {', '.join(sorted(keys))} "
                        f"(allowed: {_allowed(cls, parent)})")
    return "; ".join(messages)
