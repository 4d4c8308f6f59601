"""Configs and the one override mechanism: `--set KEY=VALUE`.

Values parse as Python literals where they can (`20`, `1e-3`, `[1024, 2048]`,
`True`) and otherwise stay strings (`performer`); they are never evaluated as
code (`ast.literal_eval` only).
"""

from __future__ import annotations

import ast
from typing import Any


class ConfigError(ValueError):
  """A user-facing configuration error: one sentence, exit status 2 on the command line."""


def parse_value(text: str) -> Any:
  """Parses one `--set` value: a Python literal where possible, else the string itself."""
  lowered = text.strip()
  if lowered in ("true", "false"):
    return lowered == "true"
  if lowered in ("none", "null"):
    return None
  try:
    return ast.literal_eval(lowered)
  except (ValueError, SyntaxError):
    return lowered


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
  """['a.b=1', 'c=x'] -> {'a.b': 1, 'c': 'x'}; a malformed item raises ConfigError."""
  out: dict[str, Any] = {}
  for item in items or []:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
      raise ConfigError(f"--set expects KEY=VALUE with a dotted KEY such as train.steps=20, got {item!r}.")
    out[key] = parse_value(value)
  return out


def apply_overrides(defaults: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
  """Returns `defaults` updated by `overrides`, refusing unknown keys and values of the wrong type.

  Ints are accepted where floats are expected; a list where a list is expected.
  """
  out = dict(defaults)
  for key, value in overrides.items():
    if key not in defaults:
      raise ConfigError(f"unknown key {key!r} for {where}; valid keys are {', '.join(sorted(defaults))}.")
    expected = defaults[key]
    ok = (expected is None or value is None or isinstance(value, type(expected))
          or (isinstance(expected, float) and isinstance(value, int) and not isinstance(value, bool))
          or (isinstance(expected, (list, tuple)) and isinstance(value, (list, tuple))))
    if isinstance(expected, int) and isinstance(value, bool) and not isinstance(expected, bool):
      ok = False
    if not ok:
      raise ConfigError(
          f"{where}: {key}={value!r} has type {type(value).__name__}, expected {type(expected).__name__}"
          f" like the default {expected!r}.")
    out[key] = list(value) if isinstance(value, tuple) else value
  return out
