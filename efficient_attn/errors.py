"""The user-facing error type and the message helper every layer uses.

A leaf: it imports nothing from efficient_attn, so the attention and MoE packages can
phrase their errors the same way as the configs without importing them (the configs
import those packages to validate against their registries). `efficient_attn.config`
re-exports both names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
  """A user-facing configuration error: one sentence, exit status 2 on the command line."""


def did_you_mean(name, valid: Iterable) -> str:
  """" did you mean 'x'?" for the valid name closest to `name` (difflib, ratio >= 0.6), else ""."""
  match = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
  return f" did you mean {match[0]!r}?" if match else ""
