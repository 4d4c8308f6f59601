"""FLOPs per token, peak FLOP/s and MFU.

First version (the training loop's MFU): the textbook dense-transformer count
6·N + 12·L·D·T per token (Kaplan et al. 2020; nanoGPT's estimate), with N the
non-embedding parameters that one token actually uses (MoE: router + top_k
experts, not all E). Per-family attention FLOPs (local, sparse, linear,
Performer) and executed-vs-ideal MoE FLOPs are refined by the experiments work;
`textbook_flops_per_token` is what the MFU column uses until then.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


def active_params(cfg) -> dict[str, int]:
  """Non-embedding parameter counts of a TransformerLM config: total and active per token."""
  m = cfg
  H = m.d_model // m.num_heads
  K = m.num_kv_heads or m.num_heads
  attn = m.d_model * H * (2 * m.num_heads + 2 * K)
  ffn = (3 if m.ffn_activation == "swiglu" else 2) * m.d_model * m.ffn_dim
  n_moe = m.num_layers // m.moe_every if m.num_experts else 0
  norms = 2 * m.d_model
  total = m.num_layers * (attn + norms) + (m.num_layers - n_moe) * ffn
  active = total
  if n_moe:
    router = m.d_model * m.num_experts
    total += n_moe * (router + m.num_experts * ffn)
    active += n_moe * (router + m.top_k * ffn)
  return {"total": total, "active": active}


def textbook_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6·N_active + 12·L·D·T (forward + backward, full attention)."""
  return 6.0 * active_params(cfg)["active"] + 12.0 * cfg.num_layers * cfg.d_model * seq_len


# bf16 dense peak FLOP/s per chip, from vendor specs.
_KNOWN_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V5E": 197e12, "V5P": 459e12, "V4": 275e12,
                "V6": 918e12, "L4": 121e12, "A10": 125e12}


@functools.lru_cache(maxsize=None)
def peak_flops_per_device(dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s of one device, where it came from).

  GPU/TPU: a lookup by device kind (bf16 dense). CPU: measured — the FLOP/s of a
  2048² float32 matmul in this process, so MFU on CPU means "fraction of what
  this machine's BLAS does".
  """
  dev = jax.devices()[0]
  kind = dev.device_kind.upper().replace(" ", "")
  for name, peak in _KNOWN_PEAKS.items():
    if name in kind:
      return peak, f"spec sheet ({dev.device_kind})"
  n = 2048
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best, f"measured {n}x{n} {dtype} matmul on {dev.platform}"


def mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int, peak: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
  return flops_per_token * tokens_per_sec / (peak * num_devices)
