"""`efficient-attn bench attention`: forward + backward time and compiled memory per attention family.

The CPU counterpart of the Long Range Arena efficiency table (Tay et al. 2020,
Table 2), for the attention core alone (the LM around it: `experiment
attention_scaling`). Speed is measured side by side in one process after a
warm-up call, memory is XLA's compiled temporary bytes (`efficient_attn.measure`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from efficient_attn.measure import bench_settings, compile_fn, format_table, temp_bytes, time_compiled

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
  """ConfigError (one sentence) on a setting no variant can run with, before anything compiles."""
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

  s = bench_settings(ATTENTION_DEFAULTS, settings, "bench attention")
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
  """The Markdown table of `bench_attention` rows."""
  return format_table([{**r, "temp_mib": r["temp_bytes"] / 2**20} for r in rows], ATTENTION_COLUMNS)
