"""Compile time of a hybrid LM's training step against depth, scanned over its period and unrolled.

    python scripts/compile_time.py [--layers 12 48] [--pattern local,local,local,local,local,softmax] [--repeats 3]

For each depth and scan setting: the seconds to lower and compile the jitted value-and-grad of the LM loss
(a fresh jit each time, XLA's compilation cache off), the median and spread over `--repeats`. With
model.scan_layers the period is compiled once and repeated (`model.period`), so the time should stay
nearly flat in depth; unrolled, it grows with the layer count.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, nargs="+", default=[12, 48])
  p.add_argument("--pattern", default="local,local,local,local,local,softmax")
  p.add_argument("--d-model", type=int, default=64)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import optax

  from efficient_attn.config import ModelConfig
  from efficient_attn.model import TransformerLM

  jax.config.update("jax_enable_compilation_cache", False)
  pattern = tuple(args.pattern.split(","))
  tokens = jnp.zeros((2, args.seq_len), jnp.int32)
  print(f"pattern {list(pattern)}, d_model {args.d_model}, T {args.seq_len}, {jax.devices()[0].device_kind}")
  print("| layers | scan_layers | compile s (median) | min-max |\n|---|---|---|---|")
  for L in args.layers:
    for scan in (True, False):
      cfg = ModelConfig(attention=pattern[0], attention_pattern=pattern, num_layers=L, d_model=args.d_model,
                        num_heads=4, ffn_dim=2 * args.d_model, scan_layers=scan,
                        family_options={"local": {"window": 32}} if "local" in pattern[1:] else None,
                        attention_options={"window": 32} if pattern[0] == "local" else None)
      model = TransformerLM(cfg)
      variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)

      def loss(v, t):
        logits = model.apply(v, t)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).mean()

      times = []
      for _ in range(args.repeats):
        step = jax.jit(jax.value_and_grad(loss))  # a new jit: nothing cached in-process
        t0 = time.perf_counter()
        step.lower(variables, tokens).compile()
        times.append(time.perf_counter() - t0)
      print(f"| {L} | {scan} | {statistics.median(times):.2f} | {min(times):.2f}-{max(times):.2f} |", flush=True)


if __name__ == "__main__":
  main()
