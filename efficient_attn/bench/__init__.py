"""`efficient-attn bench attention|moe`: the side-by-side timing commands (`attention.py`, `moe.py`).

They sit above the packages they measure (they read configs' override mechanism and
`flops`), so they live here rather than inside `efficient_attn.attention` / `.moe`.
What both share beyond this settings parser (interleaved timing rounds, the settings
header, the `--help` listing) is in `efficient_attn.measure`.
"""

from __future__ import annotations

from typing import Any

from efficient_attn.config import apply_overrides


def bench_settings(defaults: dict[str, Any], overrides: dict[str, Any] | None, where: str) -> dict[str, Any]:
  """`defaults` updated by `overrides` (`config.apply_overrides`: unknown keys and wrong types are a
  ConfigError of one sentence), where a scalar given for a list-valued setting is a one-element list
  (`--set seq_lens=1024` means [1024]). Each bench then checks its own values."""
  overrides = {k: [v] if isinstance(defaults.get(k), list) and not isinstance(v, (list, tuple)) else v
               for k, v in (overrides or {}).items()}
  return apply_overrides(defaults, overrides, where)
