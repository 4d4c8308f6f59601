"""Per-device compiled memory and collective bytes of the recurrent families under context parallelism.

    python scripts/context_memory.py

Compiles (does not run) the fwd+bwd of one attention call at T = 16384 split over 1, 2, 4 and 8 emulated
CPU devices and prints a Markdown table: temp and argument bytes per device (`compiled.memory_analysis()`)
and the bytes of every collective in the compiled program (`compiled.as_text()`).
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from efficient_attn.attention import delta_rule_attention, gated_linear_attention  # noqa: E402

B, N, K, H, Hv, T = 1, 4, 4, 64, 64, 16384
COLLECTIVE = re.compile(r" (all-gather|reduce-scatter|all-reduce|collective-permute|all-to-all)(-start)?\(")


def gla(q, k, v, g, **ctx):
  return gated_linear_attention(q, k, v, -jax.nn.softplus(g), **ctx)


def gated_delta(q, k, v, g, **ctx):
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  return delta_rule_attention(q, k, v, jax.nn.sigmoid(g), log_decay=-jax.nn.softplus(g), **ctx)


def measure(family, shards: int) -> tuple[float, float, float]:
  """(temp MiB, argument MiB, collective KiB) per device of the compiled fwd+bwd on `shards` devices."""
  mesh = jax.make_mesh((shards,), ("context",), axis_types=(AxisType.Auto,), devices=jax.devices()[:shards])
  split = NamedSharding(mesh, P(None, "context"))
  spec = lambda *d: jax.ShapeDtypeStruct(d, jnp.float32, sharding=split)  # noqa: E731
  args = (spec(B, T, N, H), spec(B, T, K, H), spec(B, T, K, Hv), spec(B, T, K))
  ctx = {} if shards == 1 else {"context_axis": "context"}
  fn = jax.shard_map(lambda *a: family(*a, **ctx), mesh=mesh, in_specs=P(None, "context"),
                     out_specs=P(None, "context"))
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2, 3)), out_shardings=split)
  compiled = grads.lower(*args).compile()
  moved = 0
  for line in compiled.as_text().splitlines():
    if COLLECTIVE.search(line):
      dims = re.search(r"= \(?f32\[([\d,]*)\]", line).group(1)
      moved += 4 * int(np.prod([int(d) for d in dims.split(",") if d]))
  m = compiled.memory_analysis()
  return m.temp_size_in_bytes / 2**20, m.argument_size_in_bytes / 2**20, moved / 1024


if __name__ == "__main__":
  print("| family | context | temp MiB / device | arguments MiB / device | collective KiB (fwd+bwd) |")
  print("|---|---|---|---|---|")
  for name, family in [("GLA core, scalar decay", gla), ("gated delta rule", gated_delta)]:
    for shards in (1, 2, 4, 8):
      temp, arguments, moved = measure(family, shards)
      print(f"| {name} | {shards} | {temp:.1f} | {arguments:.1f} | {moved:.0f} |", flush=True)
