"""What every config section shares: strict validation, ``${ENV}`` references, paths, secret files, YAML.

Values are checked strictly: ``"1883"`` is not a port and ``yes`` is not a boolean. String values (and
paths and choices) may reference environment variables as ``${NAME}`` or ``${NAME:-default}``; relative
paths are resolved against the directory of the config file. Both come from the validation context that
``load_config``/``parse_config`` pass (``context_for``); without one, the process environment and the
current directory are used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationInfo, WithJsonSchema
from pydantic_core import PydanticCustomError

from agent.config.errors import ConfigError, Problems, describe

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_CONTEXT_KEY = "pdm_config"


class Section(BaseModel):
    """Base of every config model: unknown keys are errors, values are frozen and checked strictly."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,  # no "1883" -> 1883 or "yes" -> True
        allow_inf_nan=False,
        protected_namespaces=(),  # fields named model_id
        hide_input_in_errors=True,  # a ValidationError printed as such never shows a secret
    )


@dataclass(frozen=True)
class LoadContext:
    """Where relative paths start and which environment ``${NAME}`` reads."""

    base_dir: Path
    environ: Mapping[str, str]


def context_for(base_dir: Path, environ: Mapping[str, str] | None) -> dict[str, Any]:
    """The validation context of a config file in ``base_dir`` (``environ`` None: the process environment)."""
    return {_CONTEXT_KEY: LoadContext(base_dir, os.environ if environ is None else environ)}


def _load_context(info: ValidationInfo) -> LoadContext:
    context = info.context or {}
    found = context.get(_CONTEXT_KEY) if isinstance(context, Mapping) else None
    return found if isinstance(found, LoadContext) else LoadContext(Path("."), os.environ)


def expand_env(value: Any, info: ValidationInfo) -> Any:
    """``${NAME}`` and ``${NAME:-default}`` in a string replaced from the environment; other values as they are."""
    if not isinstance(value, str):
        return value
    environ = _load_context(info).environ
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    expanded = _ENV_REF.sub(replace, value)
    if missing:
        template = "environment variable {names} is not set"
        if len(missing) > 1:
            template = "environment variables {names} are not set"
        raise PydanticCustomError("env_missing", template, {"names": ", ".join(missing)})
    return expanded


def _to_path(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, str | Path):
        raise PydanticCustomError("path_type", "expected a path string, got {got}", {"got": describe(value)})
    path = Path(expand_env(value, info) if isinstance(value, str) else value).expanduser()
    return path if path.is_absolute() else (_load_context(info).base_dir / path).resolve()


def _to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _strict_int(value: Any) -> Any:
    """Choices among integers (``Literal[0, 1]``) would otherwise take ``true`` and ``1.0``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("int_type", "expected an integer, got {got}", {"got": describe(value)})
    return value


def _env_int(value: Any, info: ValidationInfo) -> Any:
    """A ``${NAME}`` reference in an integer field (``port: ${MQTT_PORT:-1883}``): expanded, then read as a
    whole decimal number. Other strings stay strings, so the strict check still refuses ``"1883"``."""
    if not isinstance(value, str) or not _ENV_REF.search(value):
        return value
    text = expand_env(value, info).strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise PydanticCustomError("int_env", "{ref} gives {text}, not an integer", {"ref": value, "text": repr(text)})
    return int(text)


EnvInt = Annotated[
    int,
    BeforeValidator(_env_int),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*"}]}),
]
"""An integer that may also be given as an environment reference (ports in containers)."""


def registry_key(table: Mapping[str, Any]) -> AfterValidator:
    """Put in ``Annotated[str, BeforeValidator(expand_env), registry_key(TABLE), registry_schema(TABLE)]``: a
    ``type:`` accepted when it is a key of a plugin registry, so that a new plugin is a module and a
    registry entry, not also an edit here."""

    def check(value: str) -> str:
        if value not in table:
            choices = ", ".join(repr(k) for k in sorted(table))
            raise PydanticCustomError(
                "registry_key", "must be one of {choices}, got {got}", {"choices": choices, "got": repr(value)}
            )
        return value

    return AfterValidator(check)


def registry_schema(table: Mapping[str, Any]) -> WithJsonSchema:
    """The JSON Schema of a ``registry_key`` field: the registered keys, for editors."""
    return WithJsonSchema({"type": "string", "enum": sorted(table)})


EnvStr = Annotated[str, BeforeValidator(expand_env)]
"""A string that may reference environment variables."""
ConfigPath = Annotated[Path, BeforeValidator(_to_path)]
"""A path string (``${ENV}`` allowed, ``~`` expanded), relative to the config file's directory."""
StrList = Annotated[tuple[EnvStr, ...], BeforeValidator(_to_tuple)]
"""A YAML list of strings, kept as a tuple."""
ListAsTuple = BeforeValidator(_to_tuple)
"""Put in ``Annotated[tuple[X, ...], ListAsTuple]``: a YAML list, kept as a tuple (strict tuples refuse lists)."""
StrictIntChoice = BeforeValidator(_strict_int)
"""Put in ``Annotated[Literal[0, 1], StrictIntChoice]``."""
EnvChoice = BeforeValidator(expand_env)
"""Put in ``Annotated[Literal["a", "b"], EnvChoice]``: a choice that may come from the environment."""


def readable(file: Path) -> str | None:
    """Why ``file`` cannot be opened for reading, or None: refused at load, not at the first connection."""
    try:
        with file.open("rb"):
            return None
    except OSError as exc:
        return f"cannot read {file}: {exc.strerror}"


def read_secret(file: Path) -> str:
    """The secret in ``file``: its one line without the line break. ``ValueError`` names the file, never
    its content."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text") from None
    secret = text.removesuffix("\n").removesuffix("\r")  # the newline that `echo` and editors add
    if not secret:
        raise ValueError(f"{file} is empty")
    if "\n" in secret or "\r" in secret:
        raise ValueError(f"{file} has more than one line; it must hold the secret only")
    return secret


def secret_from_file(section: BaseModel, value_field: str, file_field: str, problems: Problems) -> None:
    """Put the content of ``{file_field}`` into ``{value_field}`` of a frozen section (read once, at load)."""
    file = getattr(section, file_field)
    if file is None:
        return
    try:
        secret = read_secret(file)
    except ValueError as exc:
        problems.add(file_field, str(exc))
        return
    current = getattr(section, value_field)
    if current is not None and current != secret:  # equal: a copy of a section already loaded
        problems.add(file_field, f"give either {value_field} or {file_field}, not both")
        return
    object.__setattr__(section, value_field, secret)  # frozen for everyone else; this is its validation


def read_yaml(path: Path, error: type[ConfigError] = ConfigError) -> Any:
    """The YAML document in ``path`` (None when empty); ``error`` names the file, and the line of a syntax
    error."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error("", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise error("", f"{path} is not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(part for part in (exc.context, exc.problem) if part)
        raise error("", f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise error("", f"{path}: not valid YAML: {exc}") from None
