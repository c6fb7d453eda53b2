"""Building a config at the edge: TOML text or file, dotted command-line overrides, copies."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.config.experiment import ExperimentConfig
from fedtune.config.sections import _require
from fedtune.errors import ConfigError


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check one TOML value against a dataclass field type; ints widen to floats."""
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        ok = isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
        _require(ok, f"`{where}` must be {annotation.__name__}, got {value!r}")
        return value
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        ok = isinstance(value, list | tuple) and all(
            isinstance(v, item) and not (item is int and isinstance(v, bool)) for v in value
        )
        _require(ok, f"`{where}` must be a list of {'integers' if item is int else 'strings'}, got {value!r}")
        return tuple(value)
    raise ConfigError(f"`{where}` has an unsupported type {annotation!r}")  # pragma: no cover


def _section(cls: type, table: Mapping[str, Any], name: str) -> Any:
    _require(isinstance(table, Mapping), f"`{name}` must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        py_key = key.replace("-", "_")
        if py_key not in known:
            raise ConfigError(f"unknown field `{name}.{key}`; known fields: {', '.join(sorted(known))}")
        kwargs[py_key] = _coerce(value, hints[py_key], f"{name}.{key}")
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate a config from a nested dict (TOML tables)."""
    sections = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    kwargs: dict[str, Any] = {}
    for name, table in data.items():
        if name not in sections:
            raise ConfigError(f"unknown section `[{name}]`; known sections: {', '.join(sections)}")
        cls = typing.get_type_hints(ExperimentConfig)[name]
        kwargs[name] = _section(cls, table, name)
    return ExperimentConfig(**kwargs)


def parse_config(text: str, *, source: str = "<config>") -> ExperimentConfig:
    """Parse TOML text; errors name the source file."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML ({err}); fix the syntax") from err
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Load a TOML config (or the defaults when ``path`` is None) and apply overrides.

    ``overrides`` maps dotted keys (``"train.local_steps"``) to values.
    """
    data: dict[str, dict[str, Any]] = {}
    source = "<defaults and command line>"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"{p}: cannot read config ({err.strerror}); check the path") from err
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{p}: not valid TOML ({err}); fix the syntax") from err
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        _require(bool(key), f"override `{dotted}` must look like section.field")
        data.setdefault(section, {})[key] = value
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def replace(cfg: ExperimentConfig, **sections: Mapping[str, Any]) -> ExperimentConfig:
    """Copy ``cfg`` with some fields of some sections changed (validated again)."""
    kwargs: dict[str, Any] = {}
    for name, changes in sections.items():
        kwargs[name] = dataclasses.replace(getattr(cfg, name), **changes)
    return dataclasses.replace(cfg, **kwargs)
