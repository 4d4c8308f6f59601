"""`efficient-attn bench attention`: forward + backward time and compiled memory per attention family.

The CPU counterpart of the Long Range Arena efficiency table (Tay et al. 2020,
Table 2), for the attention core alone (the LM around it: `experiment
attention_scaling`). At each length every variant is compiled and called once
(warm-up), then timed in `rounds` interleaved rounds (round r starts at variant r,
`measure.interleaved_times`): `time_s` is the median over rounds, `time_min_s` /
`time_max_s` the spread. Memory is XLA's compiled temporary bytes. Every row carries
the settings it ran with (`settings`, the machine included) and its variant's options.
Variants: the `jax_nn` baseline, the aliases `softmax` (materialised logits) and
`softmax_chunked`, and every registered family by name (a --plugin's too), each
built from its record with `attention_options[family]`; rows carry the family's own
forward FLOPs count beside the time and memory.

`mesh.context=P` splits each sequence over P devices (context parallelism, `attention.context`):
every family runs in `jax.shard_map` on T / P tokens per device (the baseline stays on one device,
as the reference), and rows report per-device compiled memory (temp and arguments) and the bytes
of every collective of the compiled fwd+bwd (`measure.collective_bytes`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from efficient_attn import attention
from efficient_attn.bench import bench_settings
from efficient_attn.config import ConfigError, did_you_mean
from efficient_attn.flops import spec_peak
from efficient_attn.measure import (argument_bytes, collective_bytes, compile_fn, environment, format_table,
                                    interleaved_times, peak_device_bytes, settings_header, spread, temp_bytes)

ATTENTION_DEFAULTS = {
    "variants": ["jax_nn", "softmax", "softmax_chunked", "local", "sparse", "linear", "performer"],
    "seq_lens": [1024, 2048, 4096, 8192],
    "batch": 1,
    "num_heads": 4,
    "num_kv_heads": 4,
    "head_dim": 64,
    "causal": True,
    "dtype": "float32",
    # Each family's options ({family: {option: value}}; `--set attention_options.local.window=128`).
    "attention_options": {"local": {"window": 256}, "sparse": {"block_size": 64, "num_random": 2},
                          "performer": {"num_features": 256}},
    "rounds": 3,
    "repeats": 1,
    "min_time": 0.2,
    "seed": 0,
    # Context parallelism: each sequence split over this many devices (the families; jax_nn stays on one).
    "mesh.context": 1,
    "mesh.context_layout": "zigzag",
}
SETTINGS_HELP = {
    "variants": ("jax_nn (the baseline), jax_nn_cudnn, softmax (xla), softmax_chunked, softmax_splash / _triton /"
                 " _cudnn, and any registered family"),
    "seq_lens": "sequence lengths T (queries = keys)",
    "batch": "B",
    "num_heads": "N, query heads",
    "num_kv_heads": "K, key/value heads (a divisor of N: GQA / MQA)",
    "head_dim": "H",
    "causal": "causal masking",
    "dtype": "float32 | bfloat16 | float16",
    "attention_options": "each family's options, e.g. attention_options.local.window=128",
    "rounds": "interleaved timing rounds; time = median over rounds (min / max reported)",
    "repeats": "timed calls per variant per round, at least (their median is the round's time) ...",
    "min_time": "... and until this many seconds have passed (at most 50 calls)",
    "seed": "inputs and random features",
    "mesh.context": ("devices each sequence is split over (context parallelism; the families run in shard_map on"
                     " that many devices, jax_nn on one); rows add per-device argument bytes and collective bytes"),
    "mesh.context_layout": "zigzag | contiguous: which tokens each device holds",
}

BASELINE = "jax_nn"  # jax.nn.dot_product_attention (XLA): not a family, the reference every ratio is taken to
# Named variants besides the registered families: (family, options over attention_options[family]).
# "softmax" materialises its logits like the baseline; "softmax_chunked" is its flash-style path.
ALIASES = {"softmax": ("softmax", {"implementation": "xla"}),
           "softmax_chunked": ("softmax", {"implementation": "chunked"}),
           # The fused kernels by name (attention.kernels); off their platform they run in interpret mode.
           "softmax_splash": ("softmax", {"implementation": "splash"}),
           "softmax_triton": ("softmax", {"implementation": "triton"}),
           "softmax_cudnn": ("softmax", {"implementation": "cudnn"})}
JAX_NN_CUDNN = "jax_nn_cudnn"  # jax.nn.dot_product_attention(implementation="cudnn"): GPU bf16/f16 only


def variant_names() -> list[str]:
  """Every variant the bench can run: the baseline, the aliases and every registered family."""
  return [BASELINE, JAX_NN_CUDNN, *ALIASES] + [n for n in attention.names() if n not in ALIASES]


def _options(name: str, s: dict) -> dict:
  """The options variant `name` runs with, every field resolved (the baseline: {"implementation": "xla"})."""
  import dataclasses

  if name in (BASELINE, JAX_NN_CUDNN):
    return {"implementation": "xla" if name == BASELINE else "cudnn"}
  _, options = _variant(name, s)
  return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def _variant(name: str, s: dict) -> tuple[Any, Any]:
  """(family record, its options) of a variant (not the baseline)."""
  family, extra = ALIASES.get(name, (name, {}))
  family = attention.get(family)
  return family, family.make_options({**s["attention_options"].get(family.name, {}), **extra})


def _attention_variant(name: str, s: dict, T: int) -> tuple[Callable[..., Any], dict]:
  """(f(q, k, v, inputs), inputs): the attention call variant `name` benchmarks at length T, derived from its
  family record: the prepared options (e.g. sparse's layout, built once), its buffers (the Performer's
  projection) and, for a family with per-token inputs (GLA / Mamba-2 gates, DeltaNet's β), those inputs as
  its layer computes them from a random x [B, T, N·H] with freshly initialised input params; the bench
  differentiates through them too, as training does."""
  causal = s["causal"]
  if name in (BASELINE, JAX_NN_CUDNN):
    impl = "xla" if name == BASELINE else "cudnn"
    return (lambda q, k, v, extra: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)), {}
  family, options = _variant(name, s)
  shape = attention.Shape(T, T, s["num_heads"], s["num_kv_heads"], s["head_dim"], causal)
  kw = family.call_kwargs(options, shape)
  rng_buffers, rng_params, rng_x = jax.random.split(jax.random.PRNGKey(s["seed"]), 3)
  if family.buffers is not None:
    kw.update(family.buffers(rng_buffers, options, shape))
  extra = {}
  if family.inputs is not None:
    d_model = s["num_heads"] * s["head_dim"]
    spec = family.input_params(options, shape, d_model)
    params = {n: init(k, shp, jax.numpy.float32)
              for (n, (shp, _, init)), k in zip(sorted(spec.items()), jax.random.split(rng_params, len(spec)))}
    x = jax.random.normal(rng_x, (s["batch"], T, d_model), jax.numpy.dtype(s["dtype"]))
    extra = family.inputs(params, x, options, shape)
  shards = s["mesh.context"]
  if shards > 1:
    split = attention.context.split_call
    return (lambda q, k, v, extra: split(family.fn, q, k, v, context_layout=s["mesh.context_layout"],
                                         is_causal=causal, **kw, **extra)), extra
  return (lambda q, k, v, extra: family.fn(q, k, v, is_causal=causal, **kw, **extra)), extra


def _flops(name: str, s: dict, T: int) -> dict:
  """The variant's own forward FLOPs count of one call (its family record; the baseline counts as xla softmax)."""
  if name in (BASELINE, JAX_NN_CUDNN):
    family, options = attention.get("softmax"), {"implementation": "xla" if name == BASELINE else "cudnn"}
  else:
    family, options = _variant(name, s)
  f = family.flops_per_token(options, attention.Shape(T, T, s["num_heads"], s["num_kv_heads"], s["head_dim"],
                                                      s["causal"]))
  tokens = s["batch"] * T
  return {"gflops_ideal": f["ideal"] * tokens / 1e9, "gflops_executed": f["executed"] * tokens / 1e9}


def _check_attention_settings(s: dict) -> None:
  """ConfigError (one sentence) on a setting no variant can run with, before anything compiles."""
  valid = variant_names()
  bad = [v for v in s["variants"] if v not in valid]
  if bad:
    raise ConfigError(f"unknown variants {bad} in bench attention;{did_you_mean(bad[0], valid)} valid variants are"
                      f" {valid} (a plugin's family needs --plugin FILE.py).")
  if not s["variants"] or len(set(s["variants"])) < len(s["variants"]):
    raise ConfigError(f"variants={s['variants']!r} must name at least one variant, each once.")
  families = attention.names()
  for fam in s["attention_options"]:
    if fam not in families:
      raise ConfigError(f"attention_options.{fam}: unknown attention family {fam!r};{did_you_mean(fam, families)}"
                        f" registered families are {families}.")
  for key in ("batch", "num_heads", "num_kv_heads", "head_dim", "rounds", "repeats"):
    if s[key] <= 0:
      raise ConfigError(f"{key}={s[key]} must be a positive integer.")
  if s["min_time"] < 0:
    raise ConfigError(f"min_time={s['min_time']} must be >= 0 seconds.")
  if s["dtype"] not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"dtype={s['dtype']!r} is not supported; use float32, bfloat16 or float16.")
  if s["num_heads"] % s["num_kv_heads"]:
    raise ConfigError(f"num_heads={s['num_heads']} must be a multiple of num_kv_heads={s['num_kv_heads']}.")
  if any(not isinstance(T, int) or isinstance(T, bool) or T <= 0 for T in s["seq_lens"]):
    raise ConfigError(f"seq_lens={s['seq_lens']!r} must be positive integers.")
  shards, layout = s["mesh.context"], s["mesh.context_layout"]
  if layout not in attention.context.LAYOUTS:
    raise ConfigError(f"mesh.context_layout={layout!r} is not one of {' | '.join(attention.context.LAYOUTS)}.")
  if shards < 1:
    raise ConfigError(f"mesh.context={shards} must be a positive integer.")
  if shards > len(jax.devices()):
    raise ConfigError(f"mesh.context={shards} needs {shards} devices, but {len(jax.devices())} are available (on CPU"
                      f" the command emulates them when XLA_FLAGS sets no device count).")
  for name in s["variants"]:
    if name == BASELINE:
      continue
    try:
      family, options = _variant(name, s)
      for T in s["seq_lens"]:
        shape = attention.Shape(T, T, s["num_heads"], s["num_kv_heads"], s["head_dim"], s["causal"])
        family.validate(options, shape)
        if shards > 1 and name != JAX_NN_CUDNN:
          family.validate_context(options, shape, shards, layout)
    except ValueError as e:
      raise ConfigError(f"bench attention, variant {name}: {e}") from None


def bench_attention(settings: dict | None = None, progress: bool = True) -> list[dict]:
  """Forward+backward time and compiled temporary memory per attention variant and length.

  The CPU counterpart of the Long Range Arena efficiency table (Tay et al. 2020,
  Table 2). One row per (variant, seq_len) with `time_s` (median over `rounds`
  interleaved rounds), `time_min_s`, `time_max_s`, `temp_bytes` and their ratios to
  the `jax_nn` baseline (`jax.nn.dot_product_attention`, XLA) at the same length:
  `speedup` = baseline median / median, `memory_ratio` = temp / baseline temp; plus
  `options` (the variant's resolved family options) and `settings` (all settings and
  the machine).
  """
  import jax.numpy as jnp
  from tqdm.auto import tqdm

  s = bench_settings(ATTENTION_DEFAULTS, settings, "bench attention")
  _check_attention_settings(s)
  run = {**s, **environment()}
  dtype = jnp.dtype(s["dtype"])
  B, N, K, H = s["batch"], s["num_heads"], s["num_kv_heads"], s["head_dim"]
  names = s["variants"]
  shards = s["mesh.context"]
  mesh = None
  if shards > 1:
    mesh = jax.make_mesh((shards,), (attention.context.AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:shards])
    on_shards = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, attention.context.AXIS))
  rows = []
  bar = tqdm(total=len(s["seq_lens"]) * (len(names) + s["rounds"]), desc="bench attention", disable=not progress)
  for T in s["seq_lens"]:
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(s["seed"] + T), 4)
    args = (jax.random.normal(kq, (B, T, N, H), dtype), jax.random.normal(kk, (B, T, K, H), dtype),
            jax.random.normal(kv, (B, T, K, H), dtype), jax.random.normal(kc, (B, T, N, H), dtype))
    compiled = []
    calls = []
    for name in names:
      attn, extra = _attention_variant(name, s, T)

      def loss(q, k, v, extra, ct, attn=attn):  # the cotangent is an argument, not a constant XLA could fold
        return jnp.sum(attn(q, k, v, extra).astype(jnp.float32) * ct.astype(jnp.float32))

      # Gradients w.r.t. q, k, v and the family's per-token inputs (gates, β).
      grads = jax.grad(loss, argnums=(0, 1, 2, 3))
      inputs = (*args[:3], extra, args[3])
      if mesh is not None and name not in (BASELINE, JAX_NN_CUDNN):  # split along T, laid out as the data would be
        inputs = jax.device_put(inputs, jax.tree.map(lambda x: on_shards if x.ndim >= 2 and x.shape[1] == T
                                                     else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                                                     inputs))
        with jax.set_mesh(mesh):
          compiled.append(compile_fn(grads, *inputs))
      else:
        compiled.append(compile_fn(grads, *inputs))
      calls.append(lambda c=compiled[-1], inputs=inputs: c(*inputs))
      bar.update()
    times = interleaved_times(calls, s["rounds"], s["repeats"], s["min_time"], on_round=bar.update)
    for name, c, ts in zip(names, compiled, times):
      moved = collective_bytes(c)
      row = {"variant": name, "seq_len": T, **spread(ts), "times_s": ts, "temp_bytes": temp_bytes(c),
             "argument_bytes": argument_bytes(c), "collective_bytes": sum(moved.values()), "collectives": moved,
             "context": 1 if name in (BASELINE, JAX_NN_CUDNN) else shards,
             **_flops(name, s, T), "options": _options(name, s), "settings": run,
             "device_peak_bytes": peak_device_bytes()}  # process-wide peak so far (None on CPU)
      # Useful work rate: the ideal forward FLOPs x 3 (backward ~ 2x forward) per second, and its share of the
      # chip's spec-sheet bf16 peak where known.
      row["tflops_per_s"] = 3 * row["gflops_ideal"] / row["time_s"] / 1e3
      peak = spec_peak(run.get("device_kind", ""))
      row["peak_fraction"] = row["tflops_per_s"] * 1e12 / peak if peak else None
      rows.append(row)
  bar.close()
  for r in rows:
    base = next((b for b in rows if b["variant"] == BASELINE and b["seq_len"] == r["seq_len"]), None)
    r["speedup"] = base["time_s"] / r["time_s"] if base else None
    r["memory_ratio"] = r["temp_bytes"] / base["temp_bytes"] if base and base["temp_bytes"] else None
  return rows


ATTENTION_COLUMNS = [("variant", "variant", "s"), ("seq_len", "T", "d"), ("time_s", "fwd+bwd s (median)", ".4f"),
                     ("time_min_s", "min", ".4f"), ("time_max_s", "max", ".4f"),
                     ("speedup", "speed vs jax.nn", ".2f"), ("temp_mib", "temp MiB", ".1f"),
                     ("memory_ratio", "memory vs jax.nn", ".3f"), ("gflops_ideal", "fwd GFLOP ideal", ".3f"),
                     ("gflops_executed", "fwd GFLOP executed", ".3f"), ("tflops_per_s", "TFLOP/s", ".3f")]
# Under mesh.context > 1: the devices each sequence is split over, per-device arguments, bytes moved.
CONTEXT_COLUMNS = [("context", "devices", "d"), ("argument_mib", "args MiB / device", ".1f"),
                   ("collective_kib", "collectives KiB", ".1f")]


def attention_table(rows: list[dict]) -> str:
  """The Markdown table of `bench_attention` rows (with per-device columns when a row ran split)."""
  columns = ATTENTION_COLUMNS
  if any(r.get("context", 1) > 1 for r in rows):
    columns = columns[:2] + CONTEXT_COLUMNS + columns[2:]
  return format_table([{**r, "temp_mib": r["temp_bytes"] / 2**20, "argument_mib": r.get("argument_bytes", 0) / 2**20,
                        "collective_kib": r.get("collective_bytes", 0) / 2**10} for r in rows], columns)


def attention_header(rows: list[dict]) -> str:
  """The settings header printed above the table: every setting, each variant's options, the machine."""
  if not rows:
    return "bench attention: no rows"
  settings = {k: v for k, v in rows[0]["settings"].items() if k != "attention_options"}
  return settings_header("bench attention", settings, {r["variant"]: r["options"] for r in rows})
