"""`efficient-attn bench moe`: forward + backward time and compiled memory of MoE layers.

The CPU counterpart of the throughput column of the Switch Transformer's Table 1
(Fedus et al. 2021): a dense FFN against Switch (capacity factor 1.0 / 1.25 / 2.0),
top-2, expert choice and dropless layers whose experts each have the dense FFN's
hidden size, so top-1 variants do the same useful FLOPs per token as the dense layer.

Each row: variant, num_experts, top_k, capacity_factor, time_s (one forward +
backward of mean(y²) + the aux losses w.r.t. params and x: the median over `rounds`
interleaved rounds, each round's time the median of its calls), time_min_s /
time_max_s (the fastest / slowest round), time_vs_dense (of the medians),
temp_bytes (XLA's compiled scratch memory), temp_vs_dense, flops_per_token (ideal,
forward + backward), executed_flops_per_token (capacity padding included) and
settings (every setting and the machine).

`mesh.context=P` splits every sequence over P devices (the layout a context-parallel model hands
its FFN: tokens [B, T/P, D] per device, params whole); rows then add per-device argument bytes and the
bytes of the compiled program's collectives (`measure.collective_bytes`): the routing groups are whole
sequences, so what the partitioner moves to route them shows there.

On XLA:CPU the dense FFN's GELU backward is fused into a slow transposed loop, so
with activation="gelu" (the default) MoE layers can beat the dense layer; set
{"activation": "relu"} for a matmul-bound comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn.bench import bench_settings
from efficient_attn.config import ConfigError, did_you_mean
from efficient_attn.measure import (argument_bytes, collective_bytes, compile_fn, environment, format_table,
                                    interleaved_times, settings_header, spread, temp_bytes)
from efficient_attn.moe.ffn import flops_per_token, moe_ffn, resolve_activation

VARIANTS = {
    "dense": None,
    "switch_cf1.0": dict(top_k=1, capacity_factor=1.0),
    "switch_cf1.25": dict(top_k=1, capacity_factor=1.25),
    "switch_cf2.0": dict(top_k=1, capacity_factor=2.0),
    "top2": dict(top_k=2, capacity_factor=1.25),
    "experts_choose": dict(router="experts_choose", capacity_factor=1.0),
    "dropless": dict(top_k=1, dropless=True),
}

DEFAULTS = {
    "batch": 8,             # B
    "seq_len": 512,         # T (one routing group per sequence)
    "d_model": 256,         # D
    "hidden_dim": 1024,     # F, of the dense FFN and of every expert
    "num_experts": [4, 8, 16],
    "variants": list(VARIANTS),
    "activation": "gelu",
    "dtype": "float32",
    "seed": 0,
    "rounds": 3,            # rounds over all variants, interleaved; time = the median round
    "repeats": 3,           # timed calls per round at least (after one warm-up) ...
    "min_time": 0.2,        # ... and until this many seconds have passed
    "mesh.context": 1,      # devices each sequence is split over (context parallelism)
}
SETTINGS_HELP = {
    "batch": "B", "seq_len": "T (one routing group per sequence)", "d_model": "D",
    "hidden_dim": "F, of the dense FFN and of every expert", "num_experts": "E values to run each MoE variant at",
    "variants": ", ".join(VARIANTS),
    "activation": "gelu | gelu_exact | relu | silu (relu: a matmul-bound comparison on CPU)",
    "dtype": "inputs' and params' dtype, e.g. float32 | bfloat16", "seed": "inputs and params",
    "rounds": "interleaved timing rounds; time = median over rounds (min / max reported)",
    "repeats": "timed calls per variant per round, at least (their median is the round's time) ...",
    "min_time": "... and until this many seconds have passed (at most 50 calls)",
    "mesh.context": "devices each sequence is split over; rows add per-device argument and collective bytes",
}

COLUMNS = [
    ("variant", "variant", "s"), ("num_experts", "E", "d"), ("top_k", "k", "d"),
    ("capacity_factor", "cf", ".2f"), ("time_s", "fwd+bwd s (median)", ".4f"), ("time_min_s", "min", ".4f"),
    ("time_max_s", "max", ".4f"),
    ("time_vs_dense", "time / dense", ".2f"), ("temp_bytes", "temp bytes", ",d"),
    ("temp_vs_dense", "temp / dense", ".2f"), ("flops_per_token", "FLOPs/token", ",.0f"),
    ("executed_flops_per_token", "executed FLOPs/token", ",.0f"),
]


def _settings(settings: dict | None) -> dict:
  """DEFAULTS updated by `settings` (`bench.bench_settings`), then the MoE bench's own checks."""
  s = bench_settings(DEFAULTS, settings, "bench moe")
  for v in s["variants"]:
    if v not in VARIANTS:
      raise ConfigError(f"bench_moe: unknown variant {v!r} in `variants`;{did_you_mean(v, VARIANTS)} valid variants"
                        f" are {list(VARIANTS)}.")
  for key in ("batch", "seq_len", "d_model", "hidden_dim", "repeats", "rounds"):
    if not isinstance(s[key], int) or s[key] <= 0:
      raise ConfigError(f"bench_moe: setting {key!r}={s[key]!r} must be a positive integer.")
  if s["min_time"] < 0:
    raise ConfigError(f"bench_moe: setting 'min_time'={s['min_time']!r} must be >= 0 seconds.")
  if not s["num_experts"] or any(not isinstance(e, int) or e < 2 for e in s["num_experts"]):
    raise ConfigError(f"bench_moe: setting 'num_experts'={s['num_experts']!r} must be a list of integers >= 2.")
  resolve_activation(s["activation"], "bench_moe")
  P = s["mesh.context"]
  if not isinstance(P, int) or P < 1 or s["seq_len"] % P:
    raise ConfigError(f"bench_moe: mesh.context={P!r} must be a positive integer dividing seq_len={s['seq_len']}.")
  if P > len(jax.devices()):
    raise ConfigError(f"bench_moe: mesh.context={P} needs {P} devices, but {len(jax.devices())} are available (on CPU"
                      " the command emulates them when XLA_FLAGS sets no device count).")
  return s


def _dense_loss(params, x_BTD, act):
  h = act(jnp.einsum("BTD,DF->BTF", x_BTD, params["w_in"]))
  return jnp.mean(jnp.square(jnp.einsum("BTF,FD->BTD", h, params["w_out"])))


def _moe_loss(params, x_BTD, act, options):
  y, aux = moe_ffn(x_BTD, params, activation=act, **options)
  return jnp.mean(jnp.square(y)) + 0.01 * aux["load_balancing_loss"] + 0.001 * aux["router_z_loss"]


def _params(rng, D, F, E, dtype):
  k = jax.random.split(rng, 3)
  w_in = jax.random.normal(k[0], (E or 1, D, F), dtype) * D ** -0.5
  w_out = jax.random.normal(k[1], (E or 1, F, D), dtype) * F ** -0.5
  if not E:
    return {"w_in": w_in[0], "w_out": w_out[0]}
  return {"router": jax.random.normal(k[2], (D, E), dtype) * D ** -0.5, "w_in": w_in, "w_out": w_out}


def _compile(loss, params, x, mesh=None):
  if mesh is None:
    compiled = compile_fn(jax.grad(loss, argnums=(0, 1)), params, x)
  else:
    with jax.set_mesh(mesh):
      compiled = compile_fn(jax.grad(loss, argnums=(0, 1)), params, x)
  return compiled, temp_bytes(compiled)


def bench_moe(settings: dict | None = None, progress: bool = True) -> list[dict]:
  """Forward + backward time and compiled temp memory of MoE variants vs a dense FFN.

  `settings` overrides DEFAULTS (keys: batch, seq_len, d_model, hidden_dim, num_experts,
  variants, activation, dtype, seed, repeats, min_time, rounds); an unknown key or
  variant is a ConfigError (a ValueError). The dense FFN is measured once, every other variant at each
  E. All variants are compiled and called once first, then timed in `rounds` interleaved
  rounds (round r starts at variant r; `measure.interleaved_times`), so neither their order
  nor a load change on the machine favours one of them.
  Returns one dict per (variant, E); `format_moe_table(rows)` renders them.
  """
  s = _settings(settings)
  B, T, D, F = s["batch"], s["seq_len"], s["d_model"], s["hidden_dim"]
  dtype = jnp.dtype(s["dtype"])
  act = resolve_activation(s["activation"], "bench_moe")
  rng_x, rng_p = jax.random.split(jax.random.key(s["seed"]))
  x = jax.random.normal(rng_x, (B, T, D), dtype)
  mesh, whole = None, None
  if s["mesh.context"] > 1:  # tokens split along T, params whole
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((s["mesh.context"],), ("context",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:s["mesh.context"]])
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "context")))
    whole = NamedSharding(mesh, PartitionSpec())
  configs = [("dense", None)] + [(v, E) for E in s["num_experts"] for v in s["variants"] if v != "dense"]
  run = {**s, **environment()}
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(configs) + s["rounds"], desc="bench moe", leave=False)
  rows, calls = [], []
  for variant, E in configs:
    params = _params(rng_p, D, F, E, dtype)
    if whole is not None:
      params = jax.device_put(params, whole)
    options = VARIANTS[variant] or {}
    if E is None:
      compiled, temp = _compile(lambda p, x: _dense_loss(p, x, act), params, x, mesh)
      flops = {"ideal": 4.0 * D * F, "executed": 4.0 * D * F}
    else:
      compiled, temp = _compile(lambda p, x, o=options: _moe_loss(p, x, act, o), params, x, mesh)
      dropless = options.get("dropless", False)
      flops = flops_per_token(D, F, E, top_k=options.get("top_k", 1), tokens_per_group=T,
                              capacity_factor=None if dropless else options.get("capacity_factor"))
    rows.append({"variant": variant, "num_experts": E, "top_k": options.get("top_k", 1) if E else None,
                 "capacity_factor": None if options.get("dropless") else options.get("capacity_factor"),
                 "temp_bytes": temp, "argument_bytes": argument_bytes(compiled),
                 "collective_bytes": sum(collective_bytes(compiled).values()), "context": s["mesh.context"],
                 "flops_per_token": 3 * flops["ideal"],
                 "executed_flops_per_token": 3 * flops["executed"]})
    calls.append(lambda c=compiled, p=params: c(p, x))
    bar and bar.update()
  times = interleaved_times(calls, s["rounds"], s["repeats"], s["min_time"], on_round=bar and bar.update)
  bar and bar.close()
  for row, ts in zip(rows, times):
    row.update(spread(ts), times_s=ts, settings=run)
  dense = rows[0]
  for row in rows:
    row["time_vs_dense"] = row["time_s"] / dense["time_s"]
    row["temp_vs_dense"] = row["temp_bytes"] / dense["temp_bytes"] if dense["temp_bytes"] else None
  return rows


def format_moe_table(rows: list[dict]) -> str:
  """The Markdown table of `bench_moe` rows (with per-device columns when the sequences were split)."""
  columns = COLUMNS
  if any(r.get("context", 1) > 1 for r in rows):
    columns = columns + [("context", "devices", "d"), ("argument_bytes", "args bytes / device", ",d"),
                         ("collective_bytes", "collective bytes", ",d")]
  return format_table(rows, columns)


def moe_header(rows: list[dict]) -> str:
  """The settings header printed above the table: every setting and the machine."""
  return settings_header("bench moe", rows[0]["settings"]) if rows else "bench moe: no rows"
