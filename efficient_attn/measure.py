"""Measurement helpers shared by the benches, the trainer and the experiments.

Speed is measured side by side in one process, after a warm-up call, with
`block_until_ready`; memory is XLA's `compiled.memory_analysis()` of the same
compiled function (deterministic on any backend), plus the device's peak bytes
where the backend reports them (GPU/TPU); executed FLOPs are XLA's
`compiled.cost_analysis()`. FLOPs accounting per family (ideal, executed, MFU)
is `efficient_attn.flops`.

Also the one settings parser of `efficient-attn bench attention|moe`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import jax


def compile_fn(fn: Callable[..., Any], *args):
  """jit-lowers and compiles `fn(*args)`; returns the compiled executable."""
  return jax.jit(fn).lower(*args).compile()


def temp_bytes(compiled) -> int:
  """Temporary (scratch) bytes XLA allocates for one call of `compiled`."""
  mem = compiled.memory_analysis()
  return int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0


def xla_flops(compiled) -> float:
  """XLA's FLOPs count of one call of `compiled` (`cost_analysis()["flops"]`; 0.0 if not reported).

  Of an SPMD program this is one device's share. XLA counts a while / scan loop body
  once, whatever its trip count, and counts elementwise ops as FLOPs too.
  """
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per device program
  return float(cost.get("flops", 0.0))


def time_compiled(compiled, *args, repeats: int = 3, min_time: float = 0.2) -> float:
  """Median wall-clock seconds of one call, after one warm-up call.

  Repeats at least `repeats` times and until `min_time` seconds have passed, so
  fast calls are not dominated by timer noise.
  """
  jax.block_until_ready(compiled(*args))
  times, start = [], time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 50):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  times.sort()
  return times[len(times) // 2]


def peak_device_bytes() -> int | None:
  """`peak_bytes_in_use` of the first device where the backend reports it (GPU/TPU), else None."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # CPU backends may not implement memory_stats.
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
  """A Markdown table; columns are (key, header, format spec); a missing value is "-"."""
  head = "| " + " | ".join(h for _, h, _ in columns) + " |"
  rule = "|" + "|".join("---" for _ in columns) + "|"
  body = []
  for r in rows:
    cells = []
    for key, _, spec in columns:
      v = r.get(key)
      cells.append("-" if v is None else format(v, spec))
    body.append("| " + " | ".join(cells) + " |")
  return "\n".join([head, rule, *body])


def write_json(rows: list[dict], path: str) -> None:
  """Writes `rows` to `path` as one indented JSON list."""
  with open(path, "w") as f:
    json.dump(rows, f, indent=1)


def bench_settings(defaults: dict[str, Any], overrides: dict[str, Any] | None, where: str) -> dict[str, Any]:
  """`defaults` updated by `overrides` (`config.apply_overrides`: unknown keys and wrong types are a
  ConfigError of one sentence), where a scalar given for a list-valued setting is a one-element list
  (`--set seq_lens=1024` means [1024]). Each bench then checks its own values."""
  from efficient_attn.config import apply_overrides

  overrides = {k: [v] if isinstance(defaults.get(k), list) and not isinstance(v, (list, tuple)) else v
               for k, v in (overrides or {}).items()}
  return apply_overrides(defaults, overrides, where)
