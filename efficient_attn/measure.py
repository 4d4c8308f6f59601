"""Measurement helpers shared by the benches, the trainer and the experiments.

Speed is measured side by side in one process, after a warm-up call, with
`block_until_ready`; memory is XLA's `compiled.memory_analysis()` of the same
compiled function (deterministic on any backend), plus the device's peak bytes
where the backend reports them (GPU/TPU); executed FLOPs are XLA's
`compiled.cost_analysis()`. FLOPs accounting per family (ideal, executed, MFU)
is `efficient_attn.flops`.

Also what both `efficient-attn bench attention|moe` (`efficient_attn.bench`) share: the
interleaved timing rounds (median / min / max over rounds), the settings header and the
`--help` listing of their keys. This module imports nothing from efficient_attn: the
attention registry counts FLOPs with it.
"""

from __future__ import annotations

import json
import re
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


def argument_bytes(compiled) -> int:
  """Bytes of the arguments of one call of `compiled` (one device's share of an SPMD program)."""
  mem = compiled.memory_analysis()
  return int(getattr(mem, "argument_size_in_bytes", 0)) if mem is not None else 0


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_COLLECTIVE = re.compile(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8}


def collective_bytes(compiled) -> dict[str, int]:
  """{collective: bytes its results hold on one device, summed over the program}, from `compiled.as_text()`.

  All-gather / reduce-scatter / all-reduce / collective-permute / all-to-all; of an async `-start` form
  (whose result is (operand, output, ...)) the output only. A collective inside a loop counts once per
  occurrence in the text, not per trip (as XLA's FLOPs count). Empty for a program with none.
  """
  out: dict[str, int] = {}
  for line in compiled.as_text().splitlines():
    found = _COLLECTIVE.search(line)
    if not found:
      continue
    size, arrays = 0, _ARRAY.findall(found.group(1))
    if found.group(3) and len(arrays) > 1:
      arrays = arrays[1:2]
    for dtype, dims in arrays:
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      size += n * _ITEM_BYTES.get(dtype, 4)
    out[found.group(2)] = out.get(found.group(2), 0) + size
  return out


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


def interleaved_times(calls: list[Callable[[], Any]], rounds: int, repeats: int = 1, min_time: float = 0.0,
                      on_round: Callable[[], None] | None = None) -> list[list[float]]:
  """Per call, its time in each of `rounds` rounds (seconds; `out[i][r]`), measured side by side.

  Every call is made once first (warm-up: compilation caches, allocator, page faults). Round r
  then times every call once, starting at call r (mod n) and wrapping around, so no call is
  always first or last and a load change on the machine hits all of them alike. A call's time
  in a round is the median of at least `repeats` runs that last at least `min_time` seconds
  together (at most 50 runs), each ended by `block_until_ready`.
  """
  for call in calls:
    jax.block_until_ready(call())
  out: list[list[float]] = [[] for _ in calls]
  n = len(calls)
  for r in range(rounds):
    for i in [(r + j) % n for j in range(n)]:
      times, start = [], time.perf_counter()
      while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(calls[i]())
        times.append(time.perf_counter() - t0)
      out[i].append(sorted(times)[len(times) // 2])
    if on_round is not None:
      on_round()
  return out


def spread(times: list[float]) -> dict[str, float]:
  """{"time_s": median, "time_min_s", "time_max_s"} of per-round times (the median of an even count:
  the mean of the middle two)."""
  ts = sorted(times)
  mid = len(ts) // 2
  median = ts[mid] if len(ts) % 2 else (ts[mid - 1] + ts[mid]) / 2
  return {"time_s": median, "time_min_s": ts[0], "time_max_s": ts[-1]}


def environment() -> dict[str, Any]:
  """Where a measurement ran: backend, device kind, device count, jax version."""
  devices = jax.devices()
  return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind, "num_devices": len(devices),
          "jax_version": jax.__version__}


def settings_header(title: str, settings: dict[str, Any], options: dict[str, dict] | None = None) -> str:
  """The lines a bench prints above its table: every setting, each variant's options, where it ran."""
  env = {k: settings[k] for k in ("backend", "device_kind", "num_devices", "jax_version") if k in settings}
  plain = {k: v for k, v in settings.items() if k not in env and not isinstance(v, dict)}
  lines = [f"{title}: " + " ".join(f"{k}={v}" for k, v in plain.items())]
  if options:
    lines.append("options:")
    lines += [f"  {name}: " + (" ".join(f"{k}={v}" for k, v in opts.items()) or "-")
              for name, opts in options.items()]
  if env:
    lines.append(f"on {env.get('backend')} ({env.get('device_kind')}, {env.get('num_devices')} device(s)),"
                 f" jax {env.get('jax_version')}")
  if "rounds" in settings:
    lines.append(f"time: median over {settings['rounds']} rounds (min, max beside it); round r times every variant"
                 " once, in an order rotated by r, after one warm-up call each")
  return "\n".join(lines)


def settings_help(title: str, defaults: dict[str, Any], docs: dict[str, str] | None = None) -> str:
  """`--help` text: one line per key, `KEY=DEFAULT  what it sets`."""
  docs = docs or {}
  items = [(f"{k}={v}", docs.get(k, "")) for k, v in defaults.items()]
  width = min(max(len(a) for a, _ in items), 26)
  lines = [f"{title}:"] if title else []
  for a, b in items:  # a long KEY=DEFAULT gets its description on the next line
    lines += [f"  {a.ljust(width)}  {b}".rstrip()] if len(a) <= width else [f"  {a}", f"  {'':{width}}  {b}"]
  return "\n".join(lines)


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
  """Writes `rows` to `path` as one indented JSON list (a value JSON cannot hold is written as its str)."""
  with open(path, "w") as f:
    json.dump(rows, f, indent=1, default=str)
