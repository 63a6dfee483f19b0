"""A small TOML writer for `--check` (the resolved configuration, defaults filled in)."""

from __future__ import annotations

import json
from typing import Any

import msgspec

__all__ = ["dumps"]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + "}"
    msg = f"cannot write {type(value).__name__} as TOML"
    raise TypeError(msg)


def _table(name: str, table: dict[str, Any], out: list[str]) -> None:
    if name:
        out.append(f"\n[{name}]")
    for key, value in table.items():
        if not isinstance(value, dict) or not value:
            out.append(f"{key} = {_value(value)}")
    for key, value in table.items():
        if isinstance(value, dict) and value:
            _table(f"{name}.{key}" if name else key, value, out)


def dumps(config: msgspec.Struct) -> str:
    """The configuration as TOML text."""
    out: list[str] = []
    _table("", msgspec.to_builtins(config), out)
    return "\n".join(out).lstrip("\n") + "\n"
