"""Speed and memory tables: `efficient-attn bench attention|moe`.

Speed is measured side by side in one process, after a warm-up call, with
`block_until_ready`; memory is XLA's `compiled.memory_analysis()` of the same
compiled function (deterministic on any backend), plus the device's peak bytes
where the backend reports them (GPU/TPU).
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
  """A Markdown table; columns are (key, header, format spec)."""
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
  with open(path, "w") as f:
    json.dump(rows, f, indent=1)


# ----------------------------------------------------------------------------- attention

ATTENTION_DEFAULTS = {
    "variants": ["jax_nn", "softmax", "softmax_chunked", "local", "sparse", "linear", "performer"],
    "seq_lens": [1024, 2048, 4096, 8192],
    "batch": 1,
    "num_heads": 4,
    "num_kv_heads": 4,
    "head_dim": 64,
    "causal": True,
    "dtype": "float32",
    "window": 256,
    "block_size": 64,
    "sparse_window": 3,
    "sparse_global": 1,
    "sparse_random": 2,
    "num_features": 256,
    "repeats": 3,
    "seed": 0,
}

ATTENTION_VARIANTS = ("jax_nn", "softmax", "softmax_chunked", "local", "sparse", "linear", "performer")


def _attention_variant(name: str, s: dict, T: int) -> Callable[..., Any]:
  """The attention call `f(q, k, v)` that variant `name` benchmarks at length T."""
  import numpy as np

  from efficient_attn import attention as A

  causal = s["causal"]
  if name == "jax_nn":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  if name == "softmax":
    return lambda q, k, v: A.softmax_attention(q, k, v, is_causal=causal, implementation="xla")
  if name == "softmax_chunked":
    return lambda q, k, v: A.softmax_attention(q, k, v, is_causal=causal, implementation="chunked")
  if name == "local":
    return lambda q, k, v: A.local_attention(q, k, v, is_causal=causal, window=s["window"])
  if name == "sparse":
    nb = T // s["block_size"]
    layout = A.masks.bigbird_layout(nb, nb, window=s["sparse_window"], num_global=s["sparse_global"],
                                    num_random=s["sparse_random"], seed=s["seed"])
    layout = np.asarray(layout)
    return lambda q, k, v: A.block_sparse_attention(q, k, v, is_causal=causal, layout=layout,
                                                    block_size=s["block_size"])
  if name == "linear":
    return lambda q, k, v: A.linear_attention(q, k, v, is_causal=causal)
  if name == "performer":
    proj = A.performer_projection(jax.random.PRNGKey(s["seed"]), s["num_features"], s["head_dim"])
    return lambda q, k, v: A.performer_attention(q, k, v, is_causal=causal, projection=proj)
  raise ValueError(f"unknown attention variant {name!r}; valid variants are {list(ATTENTION_VARIANTS)}.")


def _check_attention_settings(s: dict) -> None:
  from efficient_attn.config import ConfigError

  bad = [v for v in s["variants"] if v not in ATTENTION_VARIANTS]
  if bad:
    raise ConfigError(f"unknown variants {bad} in bench attention; valid variants are {list(ATTENTION_VARIANTS)}.")
  if s["dtype"] not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"dtype={s['dtype']!r} is not supported; use float32, bfloat16 or float16.")
  if s["num_heads"] % s["num_kv_heads"]:
    raise ConfigError(f"num_heads={s['num_heads']} must be a multiple of num_kv_heads={s['num_kv_heads']}.")
  for T in s["seq_lens"]:
    if not isinstance(T, int) or T <= 0 or T % s["block_size"]:
      raise ConfigError(f"seq_lens entry {T!r} must be a positive multiple of block_size={s['block_size']}.")


def bench_attention(settings: dict | None = None, progress: bool = True) -> list[dict]:
  """Forward+backward time and compiled temporary memory per attention variant and length.

  The CPU counterpart of the Long Range Arena efficiency table (Tay et al. 2020,
  Table 2). One row per (variant, seq_len) with `time_s`, `temp_bytes` and their
  ratios to the `jax_nn` baseline (`jax.nn.dot_product_attention`, XLA) at the
  same length: `speedup` = baseline time / time, `memory_ratio` = temp / baseline temp.
  """
  import jax.numpy as jnp
  from tqdm.auto import tqdm

  from efficient_attn.config import apply_overrides

  s = apply_overrides(ATTENTION_DEFAULTS, settings or {}, "bench attention")
  _check_attention_settings(s)
  dtype = jnp.dtype(s["dtype"])
  B, N, K, H = s["batch"], s["num_heads"], s["num_kv_heads"], s["head_dim"]
  rows = []
  jobs = [(T, v) for T in s["seq_lens"] for v in s["variants"]]
  for T, name in tqdm(jobs, desc="bench attention", disable=not progress):
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(s["seed"] + T), 4)
    q = jax.random.normal(kq, (B, T, N, H), dtype)
    k = jax.random.normal(kk, (B, T, K, H), dtype)
    v = jax.random.normal(kv, (B, T, K, H), dtype)
    ct = jax.random.normal(kc, (B, T, N, H), dtype)
    attn = _attention_variant(name, s, T)

    def loss(q, k, v, ct, attn=attn):  # the cotangent is an argument, not a constant XLA could fold
      return jnp.sum(attn(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))

    step = jax.grad(loss, argnums=(0, 1, 2))
    compiled = compile_fn(step, q, k, v, ct)
    rows.append({"variant": name, "seq_len": T, "time_s": time_compiled(compiled, q, k, v, ct,
                                                                        repeats=s["repeats"]),
                 "temp_bytes": temp_bytes(compiled)})
  for r in rows:
    base = next((b for b in rows if b["variant"] == "jax_nn" and b["seq_len"] == r["seq_len"]), None)
    r["speedup"] = base["time_s"] / r["time_s"] if base else None
    r["memory_ratio"] = r["temp_bytes"] / base["temp_bytes"] if base and base["temp_bytes"] else None
  return rows


ATTENTION_COLUMNS = [("variant", "variant", "s"), ("seq_len", "T", "d"), ("time_s", "fwd+bwd s", ".4f"),
                     ("speedup", "speed vs jax.nn", ".2f"), ("temp_mib", "temp MiB", ".1f"),
                     ("memory_ratio", "memory vs jax.nn", ".3f")]


def attention_table(rows: list[dict]) -> str:
  return format_table([{**r, "temp_mib": r["temp_bytes"] / 2**20} for r in rows], ATTENTION_COLUMNS)
