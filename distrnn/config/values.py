"""Config values from text: YAML files, `key=value` overrides, and a value checked against its key's type.

Every failure is a ConfigError of one line naming the file (and line) or the key, and what is valid.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from distrnn.errors import ConfigError


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}'{line} is not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read ({e.strerror or e})") from None
    return data if data is not None else {}


def parse_override(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"override {text!r} must look like key=value, for example model.hidden_size=128")
    return name.strip(), value.strip()


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0])}"
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(map(str, args))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _coerce_union(name: str, value: Any, tp: Any, from_text: bool) -> Any:
    """null, or the first member the value fits, in the order declared (an integer before auto)."""
    if value is None or (from_text and str(value).lower() in ("null", "none")):
        return None
    for member in [a for a in typing.get_args(tp) if a is not type(None)]:
        try:
            return coerce(name, value, member, from_text)
        except ConfigError:
            pass
    raise ConfigError(f"config key '{name}' must be {_type_name(tp)}, got {value!r}")


def coerce(name: str, value: Any, tp: Any, from_text: bool) -> Any:
    """Check `value` against the annotation `tp`; text from the command line is parsed first."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(name, value, tp, from_text)
    wrong = ConfigError(f"config key '{name}' must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if from_text and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise wrong
        return [coerce(name, v, typing.get_args(tp)[0], from_text) for v in value]
    if tp is bool:
        if from_text and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        # PyYAML reads `1e-3` (no dot) as a string, so numeric strings are accepted for floats.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise wrong
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise AssertionError(f"unsupported config type {tp}")
