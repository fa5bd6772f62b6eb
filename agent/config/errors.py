"""Config errors: every problem of a file at once, each with its dotted key path.

Pydantic reports what it found as (location, type, input, context); ``errors_of`` turns that into stable,
readable lines such as ``storage.v1.database: expected a string, got 5`` or
``inference.models[1].sensors: needs at least one item``. The cross-field checks of a section collect
their problems in ``Problems``, each with a key path relative to the section, so that they come out with
their full path too, together with all the others. The simulator's config uses the same engine.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

PROBLEMS = "config_problems"
"""Error type of a ``Problems`` report; its context holds ``problems``, (relative key path, reason) pairs."""

SECRET_KEYS = frozenset({"password", "token", "key", "secret"})
"""Keys whose value is never shown in an error, whatever is wrong with it (and whatever lies below them)."""

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """Invalid configuration. ``errors`` lists every (dotted key path, reason), in the order of the model;
    ``path`` and ``reason`` are those of the first one.

    ``str()`` is one ``path: reason`` line per error, or just the reason when the problem is the file
    itself (unreadable, not YAML).
    """

    def __init__(self, path: str, reason: str, *, errors: Sequence[tuple[str, str]] = ()) -> None:
        self.errors: list[tuple[str, str]] = list(errors) or [(path, reason)]
        self.path, self.reason = self.errors[0]
        super().__init__("\n".join(format_line(p, r) for p, r in self.errors))

    @classmethod
    def of(cls, errors: Sequence[tuple[str, str]]) -> typing.Self:
        """One exception reporting all of ``errors`` (at least one)."""
        return cls(*errors[0], errors=errors)


def format_line(path: str, reason: str) -> str:
    return f"{path}: {reason}" if path else reason


def join_path(prefix: str, key: str) -> str:
    """A key path below ``prefix``; list indexes attach without a dot.

    >>> join_path("inference", "models[1].path"), join_path("inference.models", "[1]"), join_path("", "mqtt")
    ('inference.models[1].path', 'inference.models[1]', 'mqtt')
    """
    if not prefix or not key:
        return prefix or key
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def format_loc(loc: Sequence[str | int]) -> str:
    """Pydantic's error location as a key path.

    >>> format_loc(("inference", "models", 1, "sensors"))
    'inference.models[1].sensors'
    """
    path = ""
    for part in loc:
        path = join_path(path, f"[{part}]" if isinstance(part, int) else str(part))
    return path


class Problems:
    """The problems found by the cross-field checks of one section, raised together by ``check()``.

    Raised from a model validator, each is reported with the section's own key path in front of its key.
    """

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, key: str, reason: str) -> None:
        """A problem with ``key`` (relative to the section, e.g. ``models[1].model_id``; "" = the section)."""
        self.items.append((key, reason))

    def extend(self, key: str, errors: Sequence[tuple[str, str]]) -> None:
        """The errors of a nested validation of the value at ``key`` (their paths relative to it)."""
        self.items.extend((join_path(key, path), reason) for path, reason in errors)

    def check(self) -> None:
        """Raise the problems found, if any."""
        if self.items:
            raise self.error()

    def error(self) -> PydanticCustomError:
        """The problems as the error of a validator (raise it)."""
        summary = "; ".join(format_line(key, reason) for key, reason in self.items)
        return PydanticCustomError(PROBLEMS, "{summary}", {"summary": summary, "problems": tuple(self.items)})


def describe(value: object, secret: bool = False) -> str:
    """What was given, for the ``got ...`` of a message; the value of a secret is never shown.

    >>> describe(None), describe(True), describe(2.5), describe("1883"), describe([1]), describe("pw", secret=True)
    ('null', 'true', '2.5', "'1883'", 'a list', 'a string')
    >>> describe(123456, secret=True), describe(False, secret=True)
    ('a number', 'a boolean')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        # YAML reads a password "yes", "on" or "true" as a boolean: even that is not shown.
        return "a boolean" if secret else ("true" if value else "false")
    if isinstance(value, int | float):
        return "a number" if secret else repr(value)
    if isinstance(value, str):
        return "a string" if secret or len(value) > 80 else repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def errors_of(exc: ValidationError, model: type[BaseModel]) -> list[tuple[str, str]]:
    """Every error of a validation of ``model``, as (key path, reason), in the order of the model's fields."""
    out: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False):
        path = format_loc(error["loc"])
        if error["type"] == PROBLEMS:
            out.extend((join_path(path, key), reason) for key, reason in error["ctx"]["problems"])
        else:
            out.append((path, _reason(error, model)))
    return out


def validate_model(
    model: type[M], data: Any, context: Mapping[str, Any] | None = None, error: type[ConfigError] = ConfigError
) -> M:
    """``model`` validated from ``data``; raises ``error`` reporting every problem found."""
    try:
        return model.model_validate(data, context=dict(context or {}))
    except ValidationError as exc:
        raise error.of(errors_of(exc, model)) from None


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a finite number",
    "float_parsing": "a finite number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
}
_BOUNDS = {
    "gt": (annotated_types.Gt, ">"),
    "ge": (annotated_types.Ge, ">="),
    "lt": (annotated_types.Lt, "<"),
    "le": (annotated_types.Le, "<="),
}


def _reason(error: ErrorDetails, model: type[BaseModel]) -> str:
    loc = error["loc"]
    field = _walk(model, loc)[1]
    secret = is_secret(loc)
    reason = _reason_text(error, model, field, secret)
    if secret:
        return _redacted(reason, error.get("input"))
    return reason


def is_secret(loc: Sequence[str | int]) -> bool:
    """Whether a key path is, or lies below, a secret (``mqtt.password``, ``alerts.commands.operators.ana.key``).

    >>> is_secret(("mqtt", "password")), is_secret(("storage", "v2", "token", "str")), is_secret(("mqtt", "port"))
    (True, True, False)
    """
    return any(isinstance(part, str) and part in SECRET_KEYS for part in loc)


def _redacted(reason: str, value: object) -> str:
    """A reason that cannot echo the secret it is about, even from a validator's own message."""
    if value is None or isinstance(value, bool):
        return reason
    text = value if isinstance(value, str) else repr(value)
    if text and text in reason:
        return "is not a valid value (not shown: it is a secret)"
    return reason


def _reason_text(error: ErrorDetails, model: type[BaseModel], field: FieldInfo | None, secret: bool) -> str:
    kind, loc = error["type"], error["loc"]
    ctx = error.get("ctx") or {}
    got = f", got {describe(error.get('input'), secret)}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        if parent is None:
            return "unknown key"
        renamed: Mapping[str, str] = getattr(parent, "RENAMED", {})
        if loc[-1] in renamed:
            return f"unknown key: {renamed[str(loc[-1])]}"
        allowed = sorted(parent.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=2)
        hint = f", did you mean {' or '.join(close)}?" if close else ""
        return f"unknown key{hint} (allowed: {', '.join(allowed)})"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}{got}"
    if kind == "literal_error":
        choices = _literal_choices(field) or ctx.get("expected")
        return f"must be one of {choices}{got}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"must be {_bounds(field, ctx)}{got}"
    if kind == "string_too_short":
        minimum = ctx.get("min_length")
        return "must not be empty" if minimum == 1 else f"needs at least {minimum} characters"
    if kind == "too_short":
        minimum = ctx.get("min_length")
        return "needs at least one item" if minimum == 1 else f"needs at least {minimum} items"
    if kind == "too_long":
        return f"may have at most {ctx.get('max_length')} items"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    return error["msg"]


def _unwrap(annotation: Any) -> Any:
    """The annotation without ``Annotated[...]`` and ``| None``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(inner) != 1:
                return annotation
            annotation = inner[0]
        else:
            return annotation


def _walk(model: type[BaseModel], loc: Sequence[str | int]) -> tuple[Any, FieldInfo | None]:
    """The annotation at ``loc`` below ``model`` and, when ``loc`` ends at a model field, that field."""
    annotation: Any = model
    field: FieldInfo | None = None
    for part in loc:
        annotation = _unwrap(annotation)
        origin = typing.get_origin(annotation)
        field = None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(part, str):
            if part not in annotation.model_fields:
                return None, None
            field = annotation.model_fields[part]
            annotation = field.annotation
        elif origin in (tuple, list) and isinstance(part, int):
            annotation = typing.get_args(annotation)[0]
        elif origin in (dict, Mapping) and isinstance(part, str):
            annotation = typing.get_args(annotation)[1]
        else:
            return None, None
    return annotation, field


def _model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    annotation = _unwrap(_walk(model, loc)[0])
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _literal_choices(field: FieldInfo | None) -> str | None:
    annotation = _unwrap(field.annotation) if field is not None else None
    if typing.get_origin(annotation) is not Literal:
        return None
    return ", ".join(repr(choice) for choice in typing.get_args(annotation))


def _bounds(field: FieldInfo | None, ctx: Mapping[str, Any]) -> str:
    """Every bound of the field (``in 1..65535``, ``> 0``), not only the one that was violated."""
    bounds: dict[str, Any] = {}
    for item in field.metadata if field is not None else ():
        for name, (cls, _) in _BOUNDS.items():
            if isinstance(item, cls):
                bounds[name] = getattr(item, name)
    if not bounds:
        bounds = {name: ctx[name] for name in _BOUNDS if name in ctx}
    if "ge" in bounds and "le" in bounds:
        return f"in {bounds['ge']}..{bounds['le']}"
    return " and ".join(f"{_BOUNDS[name][1]} {value}" for name, value in bounds.items())
