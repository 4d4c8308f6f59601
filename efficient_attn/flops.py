"""FLOPs per token (ideal and executed), training-step budgets, peak FLOP/s and MFU.

FLOPs are 2 per multiply-add of a matmul; elementwise work (softmax, norms,
activations, rotary positions) is left out, so XLA's `cost_analysis()`, which
counts it too, reads a few percent higher (tests/test_flops.py measures it).

Two numbers everywhere, as DESIGN.md asks:
- "ideal": what the algorithm needs. Softmax attention computes q·k and p·v for
  the visible (query, key) pairs only: 4·N·H per pair, (T+1)/2 keys per query
  when causal (Vaswani et al. 2017); local attention the window (Beltagy et al.
  2020); block-sparse attention the marked blocks of its BigBird layout (Zaheer et
  al. 2020); linear attention (Katharopoulos et al. 2020) a state update
  2·K·M·H and a read-out 2·N·M·(H+1) per token, plus the causal half of the
  intra-chunk quadratic term when chunkwise causal; Performer (Choromanski et al.
  2021) adds its features 2·M·H per head for q and k. MoE layers count the router
  and top_k experts (`moe.ffn.flops_per_token`).
- "executed": what our implementation multiplies: the full T x S logits of the
  "xla" softmax even when causal; whole tiles of the chunked softmax; the
  block-wide band of local attention; whole (padded) blocks of sparse rows; full
  chunk x chunk products of causal kernelized attention; MoE capacity padding.

Each attention family counts itself in its own file (`Family.flops`, see
`efficient_attn.attention.registry`; a plugin without one is counted by XLA);
`model_flops_per_token` sums them over a `config.ModelConfig`; train = 3·forward
(Kaplan et al. 2020). `textbook_flops_per_token` (6·N + 12·L·D·T) is kept for
comparison: it assumes full attention and is wrong for the other families.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn import attention as attention_lib
from efficient_attn.errors import ConfigError
from efficient_attn.moe import ffn as moe_ffn_lib


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
    expert = ffn * (m.expert_dim or m.ffn_dim) // m.ffn_dim
    total += n_moe * (router + m.num_experts * expert)
    active += n_moe * (router + m.top_k * expert)
  return {"total": total, "active": active}


def textbook_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6·N_active + 12·L·D·T (forward + backward, full attention)."""
  return 6.0 * active_params(cfg)["active"] + 12.0 * cfg.num_layers * cfg.d_model * seq_len


# bf16 dense peak FLOP/s of one JAX device, from vendor spec sheets, by `device_kind` (first match wins).
# TPU v2 / v3 devices are single cores (half a chip); from v4 on a device is a chip.
KNOWN_PEAKS = (
    (r"\bH100\b.*\bPCIe\b", 756e12), (r"\bH100\b.*\bNVL\b", 835e12), (r"\b(GH200|H200|H100)\b", 989e12),
    (r"\bB200\b", 2250e12), (r"\bA100\b", 312e12), (r"\bL40S\b", 362e12), (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12), (r"TPU v6 ?(lite|e)\b", 918e12), (r"TPU v5 ?(lite|e)\b", 197e12),
    (r"TPU v5p?$", 459e12), (r"TPU v4\b", 275e12), (r"TPU v3\b", 61.5e12), (r"TPU v2\b", 22.5e12),
)


def spec_peak(device_kind: str) -> float | None:
  """bf16 dense peak FLOP/s of a GPU / TPU device from KNOWN_PEAKS; None for a kind not listed."""
  return next((peak for pattern, peak in KNOWN_PEAKS if re.search(pattern, device_kind, re.IGNORECASE)), None)


PEAK_ENV = "EFFICIENT_ATTN_PEAK_FLOPS"


def given_peak() -> float | None:
  """The peak FLOP/s per device that EFFICIENT_ATTN_PEAK_FLOPS sets, or None; a ConfigError if it is not a
  positive number (the CLI checks it before anything compiles)."""
  given = os.environ.get(PEAK_ENV)
  if given is None:
    return None
  try:
    value = float(given)
  except ValueError:
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise ConfigError(f"{PEAK_ENV}={given!r} must be a positive number of FLOP/s per device (e.g. 1.5e11).")
  return value


@functools.lru_cache(maxsize=None)
def peak_flops_per_device(dtype: str = "float32") -> tuple[float | None, str]:
  """(peak FLOP/s of one device or None, where it came from / why it is unknown).

  EFFICIENT_ATTN_PEAK_FLOPS=<FLOP/s per device> in the environment sets it (e.g. a CPU's spec
  sheet, or the value an earlier run measured, so runs on a shared machine share one denominator
  and skip the measurement); a value that is not a positive number is a ValueError naming it.
  GPU/TPU: the spec sheet's bf16 dense peak (`KNOWN_PEAKS`); an unlisted kind gives None.
  CPU: measured once per process — the FLOP/s of a 2048² matmul (the best of at least 5
  calls over at least one second, so a moment of contention does not set it), so MFU on CPU
  means "fraction of what this machine's BLAS does"; `cpu_load()` at that moment is recorded
  by `measured_load`. Emulated CPU devices share the machine: divide by one device's peak on CPU.
  """
  given = given_peak()
  if given is not None:
    return given, f"{PEAK_ENV}={os.environ[PEAK_ENV]}"
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    peak = spec_peak(dev.device_kind)
    if peak is None:
      return None, f"no spec-sheet peak for device kind {dev.device_kind!r} (flops.KNOWN_PEAKS)"
    return peak, f"spec sheet, bf16 dense ({dev.device_kind})"
  load_before = cpu_load()
  n = 2048
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  best, calls, start = float("inf"), 0, time.perf_counter()
  while calls < 5 or (time.perf_counter() - start < 1.0 and calls < 100):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    best, calls = min(best, time.perf_counter() - t0), calls + 1
  _PEAK_LOAD[dtype] = max(load_before, cpu_load())
  return 2.0 * n ** 3 / best, f"measured {n}x{n} {dtype} matmul on cpu"


_PEAK_LOAD: dict[str, float] = {}


def measured_load(dtype: str = "float32") -> float | None:
  """The 1-minute load average while the CPU peak for `dtype` was measured (None before, or off CPU)."""
  return _PEAK_LOAD.get(dtype)


def cpu_load() -> float:
  """The machine's 1-minute load average (runnable threads; our own included)."""
  return os.getloadavg()[0]


def cpu_cores() -> int:
  """The cores this process may run on (its affinity where the OS tells it, else all)."""
  affinity = getattr(os, "sched_getaffinity", None)
  return len(affinity(0)) if affinity else os.cpu_count() or 1


def mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int, peak: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
  return flops_per_token * tokens_per_sec / (peak * num_devices)


def honest_mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int, peak: float | None, *,
               loads: tuple[float | None, ...] = (), cores: int | None = None) -> tuple[float | None, str | None]:
  """(MFU, None), or (None, the reason) when no trustworthy value exists: the peak is unknown, the value
  exceeds 1 (the peak was measured low), or a load average in `loads` (at the CPU peak's measurement,
  during the timed steps) exceeded `cores` (other work shared the machine)."""
  if not peak:
    return None, "peak FLOP/s unknown"
  busy = [x for x in loads if x is not None and cores and x > cores]
  if busy:
    return None, f"load average {max(busy):.1f} > {cores} cores: the machine was shared"
  value = mfu(flops_per_token, tokens_per_sec, num_devices, peak)
  if value > 1:
    return None, f"{value:.2f} > 1: the measured peak ({peak:.3g} FLOP/s) is too low to trust"
  return value, None


def _positive(value, arg: str, fn: str = "attention_flops") -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{fn}: `{arg}` must be a positive integer, got {value!r}.")
  return int(value)


def attention_flops(kind: str, seq_len: int, *, num_heads: int, head_dim: int, num_kv_heads: int | None = None,
                    causal: bool = True, options=None, **option_values) -> dict:
  """Forward FLOPs per token of one layer's attention core (after q/k/v projections, before the output one).

  kind: a registered family; self-attention, T == S == seq_len. Its options as the family's
  options dataclass (`options=`) or as keywords (`window=64`, `implementation="xla"`, ...);
  unknown ones are refused. Each family counts itself (`Family.flops`; a family without one
  is counted by XLA). Returns {"ideal", "executed", "backward"} (see the module docstring);
  2 FLOPs per multiply-add.
  """
  fn = "attention_flops"
  family = attention_lib.get(kind)
  T, N, H = _positive(seq_len, "seq_len"), _positive(num_heads, "num_heads"), _positive(head_dim, "head_dim")
  K = _positive(num_kv_heads, "num_kv_heads") if num_kv_heads else N
  if N % K:
    raise ValueError(f"{fn}: num_kv_heads={K} must divide num_heads={N}.")
  if options is not None and option_values:
    raise ValueError(f"{fn}: pass the options either as `options=` or as keywords, not both.")
  try:
    return family.flops_per_token(options if options is not None else option_values,
                                  attention_lib.Shape(T, T, N, K, H, causal))
  except ValueError as e:
    raise ValueError(f"{fn}: {e}") from None


def model_flops_per_token(m, seq_len: int, *, causal: bool = True) -> dict:
  """FLOPs per token of a TransformerLM (`config.ModelConfig` m) at sequence length `seq_len`.

  forward = dense + attention, ideal; executed_* include the families' extra work and
  MoE capacity padding (one routing group per sequence; dropless: executed = ideal).
  dense: q/k/v/o projections (GQA), FFN (gelu 2 matmuls, swiglu 3) or MoE, LM head 2·D·V;
  embedding lookup, norms, rotary and activations are not counted. train = 3·forward
  (Kaplan et al. 2020); executed_train counts the attention backward as its family does
  (the chunked softmax recomputes its logit tiles: 5 tile matmuls vs 2 forward,
  FlashAttention-2) and, with m.remat, one more forward of the blocks.
  attention_share = attention / forward.
  """
  T = _positive(seq_len, "seq_len", "model_flops_per_token")
  D, N, F = m.d_model, m.num_heads, m.ffn_dim
  H, K = D // N, m.num_kv_heads or N
  # A hybrid sums its layers' families (each with its own options); a homogeneous stack is L x one layer.
  # A layer's short convolution (model.short_conv) counts with its attention: 2·k FLOPs per q / k / v channel.
  per_family = {}
  for layer in (m.layer_configs() if m.hybrid else (m,) * m.num_layers):
    if layer.attention not in per_family:
      a = dict(attention_flops(layer.attention, T, num_heads=N, head_dim=H, num_kv_heads=K, causal=causal,
                               options=layer.options))
      conv = 2.0 * layer.conv_kernel * (N + 2 * K) * H
      if conv:
        a = {"ideal": a["ideal"] + conv, "executed": a["executed"] + conv, "backward": a["backward"] + 2 * conv}
      per_family[layer.attention] = [a, 0]
    per_family[layer.attention][1] += 1
  total = {k: sum(a[k] * n for a, n in per_family.values()) for k in ("ideal", "executed", "backward")}
  glu = m.ffn_activation == "swiglu"
  ffn = (6 if glu else 4) * D * F
  n_moe = m.num_layers // m.moe_every if m.num_experts else 0
  moe = {"ideal": 0.0, "executed": 0.0}
  if n_moe:
    moe = moe_ffn_lib.flops_per_token(D, m.expert_dim or F, m.num_experts, top_k=m.top_k, tokens_per_group=T,
                                      glu=glu,
                                      capacity_factor=None if m.dropless else m.capacity_factor)
  head = 2 * D * m.vocab_size
  base = m.num_layers * 2 * D * H * (2 * N + 2 * K) + (m.num_layers - n_moe) * ffn + head
  dense, executed_dense = base + n_moe * moe["ideal"], base + n_moe * moe["executed"]
  attention, executed_attention, backward_attention = total["ideal"], total["executed"], total["backward"]
  remat = 1.0 if m.remat else 0.0
  forward = dense + attention
  return {
      "forward": forward, "train": 3.0 * forward,
      "executed_forward": executed_dense + executed_attention,
      "executed_train": ((3.0 + remat) * executed_dense - remat * head  # remat recomputes the blocks, not the head
                         + (1.0 + remat) * executed_attention + backward_attention),
      "attention": attention, "executed_attention": executed_attention,
      "dense": float(dense), "executed_dense": float(executed_dense), "attention_share": attention / forward,
  }


def steps_for_budget(budget_flops: float, m, seq_len: int, batch_size: int, *, causal: bool = True) -> int:
  """Training steps that spend `budget_flops` (ideal train FLOPs) at batch_size x seq_len tokens per step.

  round(budget / (train FLOPs per token · tokens per step)), at least 0: the equal-compute
  comparison gives every attention family the same budget, so cheaper families train longer.
  """
  fn = "steps_for_budget"
  if isinstance(budget_flops, bool) or not isinstance(budget_flops, (int, float)) or not (
      math.isfinite(budget_flops) and budget_flops >= 0):
    raise ValueError(f"{fn}: `budget_flops` must be a finite number >= 0, got {budget_flops!r}.")
  tokens = _positive(seq_len, "seq_len", fn) * _positive(batch_size, "batch_size", fn)
  return max(0, round(budget_flops / (model_flops_per_token(m, seq_len, causal=causal)["train"] * tokens)))
