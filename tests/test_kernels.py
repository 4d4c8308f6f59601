"""The fused kernels (splash / Pallas Triton / cuDNN glue) and their choice by lowering platform.

Kernels run here in Pallas interpret mode against the XLA paths (outputs and gradients); the
choice of kernel is checked by lowering a train step for TPU and CUDA with `jax.export`.
Shapes are the smallest that still cover each branch: interpret mode is slow.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficient_attn import sharding
from efficient_attn.attention import block_sparse_attention, kernels, local_attention, masks, softmax_attention
from efficient_attn.config import ModelConfig, TrainConfig
from efficient_attn.model import TransformerLM
from efficient_attn.train import loss_fn

TRITON = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _qkv(B=2, T=160, N=4, K=2, H=16, Hv=None, seed=0, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  shapes = [(B, T, N, H), (B, T, K, H), (B, T, K, Hv or H)]
  return [jnp.asarray(r.normal(size=s), dtype) for s in shapes]


def _segments(B, T):
  """Two or three documents per row, boundaries off the 128-tiles."""
  ids = np.zeros((B, T), np.int32)
  ids[:, 50:] = 1
  ids[1:, 131:] = 2
  return jnp.asarray(ids)


def _grads(fn, q, k, v):
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))(q, k, v)


def _close(a, b, atol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol, rtol=1e-4)


# ----------------------------------------------------------------------------- kernels vs the XLA paths


@pytest.mark.parametrize("impl", ["splash", "triton"])
@pytest.mark.parametrize("causal,segments", [(True, False), (True, True), (False, True)])
def test_softmax_kernels_match_xla(impl, causal, segments):
  """T=160 pads to the kernels' tiles; GQA (N=4, K=2); segments cross the tile boundary."""
  q, k, v = _qkv()
  seg = _segments(2, 160) if segments else None
  kw = dict(is_causal=causal, segment_ids=seg)
  fn = lambda q, k, v: softmax_attention(q, k, v, implementation=impl, **kw)
  ref = lambda q, k, v: softmax_attention(q, k, v, implementation="xla", **kw)
  _close(jax.jit(fn)(q, k, v), jax.jit(ref)(q, k, v))
  _close(_grads(fn, q, k, v), _grads(ref, q, k, v), atol=1e-4)


def test_splash_sliding_window_and_value_head_dim():
  """jax.nn's (left, right) window as splash's local mask, Hv != H, bfloat16 in and out."""
  q, k, v = _qkv(T=128, Hv=8)
  for window, causal in (((20, 5), False), ((20, 20), True)):
    kw = dict(is_causal=causal, local_window_size=window)
    _close(softmax_attention(q, k, v, implementation="splash", **kw),
           softmax_attention(q, k, v, implementation="xla", **kw))
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = softmax_attention(qb, kb, vb, is_causal=True, implementation="splash")
  assert out.dtype == jnp.bfloat16
  _close(out, softmax_attention(q, k, v, is_causal=True, implementation="xla"), atol=4e-2)


def test_local_splash_matches_xla():
  """Causal with gradients, bidirectional forward; T=144 pads to two tiles."""
  q, k, v = _qkv(B=1, T=144)
  seg = _segments(1, 144)
  for causal in (True, False):
    kw = dict(is_causal=causal, window=24, segment_ids=seg)
    fn = lambda q, k, v: local_attention(q, k, v, implementation="splash", **kw)
    ref = lambda q, k, v: local_attention(q, k, v, implementation="xla", **kw)
    _close(jax.jit(fn)(q, k, v), jax.jit(ref)(q, k, v))
  _close(_grads(fn, q, k, v), _grads(ref, q, k, v), atol=1e-4)


def test_sparse_splash_per_head_layouts_match_xla():
  """A different BigBird layout per query head (2 heads, MQA), blocks of 32 inside a 128-tile: causal
  with gradients, bidirectional forward."""
  q, k, v = _qkv(B=1, T=128, N=2, K=1)
  layout = np.stack([masks.bigbird_layout(4, 4, window=1, num_global=1, num_random=1, seed=h) for h in range(2)])
  seg = _segments(1, 128)
  for causal in (False, True):
    kw = dict(is_causal=causal, layout=layout, block_size=32, segment_ids=seg)
    fn = lambda q, k, v: block_sparse_attention(q, k, v, implementation="splash", **kw)
    ref = lambda q, k, v: block_sparse_attention(q, k, v, implementation="xla", **kw)
    _close(jax.jit(fn)(q, k, v), jax.jit(ref)(q, k, v))
  _close(_grads(fn, q, k, v), _grads(ref, q, k, v), atol=1e-4)


def test_splash_runs_per_shard_under_a_mesh():
  """Under jax.set_mesh the kernel is shard_mapped over batch and heads; same numbers as one device."""
  q, k, v = _qkv(B=4, T=128)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "expert": 1}, jax.devices()[:4])
  fn = jax.jit(lambda q, k, v: softmax_attention(q, k, v, is_causal=True, implementation="splash"))
  with jax.set_mesh(mesh):
    sharded = fn(q, k, v)
    text = fn.lower(q, k, v).as_text()
  assert "shard_map" in text or "manual" in text.lower()
  _close(sharded, softmax_attention(q, k, v, is_causal=True, implementation="xla"))


@pytest.mark.all_platforms  # counts the TPU branch's plan too
def test_splash_plan_is_built_once_per_shape():
  """One plan per (shape, mask, compiled | interpret): a retrace reuses both branches' plans."""
  kernels.splash_kernel.cache_clear()
  q, k, v = _qkv(B=1, T=128, N=2, K=1)
  misses = []
  for _ in range(2):
    jax.jit(lambda q, k, v: softmax_attention(q, k, v, is_causal=True, implementation="splash"))(q, k, v)
    misses.append(kernels.splash_kernel.cache_info().misses)
  assert misses == [2, 2]  # the TPU branch's compiled kernel and the interpret-mode one, then none


def test_explicit_kernels_refuse_what_they_cannot_do():
  q, k, v = _qkv(T=128)
  bias = jnp.zeros((1, 1, 128, 128))
  cases = [
      (lambda: softmax_attention(q, k, v, bias, implementation="splash"), "splash takes no additive bias"),
      (lambda: softmax_attention(q, k, v, mask=jnp.ones((1, 1, 128, 128), bool), implementation="triton"),
       "no dense mask"),
      (lambda: softmax_attention(q, k, v, local_window_size=8, implementation="triton"), "sliding window"),
      (lambda: softmax_attention(q, k[:, :64], v[:, :64], implementation="splash"), "T == S"),
      (lambda: local_attention(q, k, v, window=8, bias=bias, implementation="splash"), "bias"),
      (lambda: local_attention(q, k, v, window=8, implementation="flash"), "implementation"),
      (lambda: block_sparse_attention(q, k, v, layout=~np.eye(8, dtype=bool), block_size=16,
                                      implementation="splash"), "diagonal"),
  ]
  if not kernels.cudnn_available():
    cases.append((lambda: softmax_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), implementation="cudnn"),
                  "GPU build of jax"))
  for fn, words in cases:
    with pytest.raises(ValueError, match=words):
      fn()


def _instructions(fn, q, k, v) -> list[str]:
  """The compiled fwd+bwd program's HLO instructions, without metadata and instruction numbering."""
  text = jax.jit(jax.grad(lambda q: jnp.sum(fn(q, k, v)))).lower(q).compile().as_text()
  lines = [re.sub(r", (metadata|frontend_attributes)=\{[^}]*\}", "", line) for line in text.splitlines() if " = " in line]
  return [re.sub(r"\.\d+", "", line).strip() for line in lines]


@pytest.mark.all_platforms
def test_default_on_cpu_compiles_exactly_the_xla_path():
  """implementation=None lowered for CPU is the program the XLA path compiles to, instruction for
  instruction: the kernels' branches cost nothing there (the CPU benchmarks are unchanged)."""
  q, k, v = _qkv(B=1, T=512, N=2, K=2)
  pairs = [(lambda q, k, v: softmax_attention(q, k, v, is_causal=True),
            lambda q, k, v: softmax_attention(q, k, v, is_causal=True, implementation="chunked")),
           (lambda q, k, v: local_attention(q, k, v, is_causal=True, window=64),
            lambda q, k, v: local_attention(q, k, v, is_causal=True, window=64, implementation="xla"))]
  for default, xla in pairs:
    ops = _instructions(default, q, k, v)
    assert ops == _instructions(xla, q, k, v)
    assert not any("custom-call" in op for op in ops)


@pytest.mark.all_platforms
def test_host_only_tracing_skips_accelerator_branches_but_never_an_export(monkeypatch):
  """Inside platform.for_this_host a CPU-only process traces only by_platform's CPU branch; the same jitted
  function exported afterwards for TPU (outside it) is traced anew and takes the TPU branch, and
  $EFFICIENT_ATTN_PLATFORMS naming an accelerator keeps every branch staged."""
  from efficient_attn import platform

  traced = []

  def f(x):
    return platform.by_platform((x,), cpu=lambda x: traced.append("cpu") or x + 1.0,
                                tpu=lambda x: traced.append("tpu") or x * 7.0)

  g, x = jax.jit(f), jnp.ones(3)
  with platform.for_this_host():
    np.testing.assert_array_equal(g(x), 2.0)
  assert traced == ["cpu"]
  exported = jax.export.export(g, platforms=["tpu"])(x)
  assert "multiply" in exported.mlir_module() and "add" not in exported.mlir_module()
  monkeypatch.setenv(platform.PLATFORMS_ENV, "cpu,tpu")
  traced.clear()
  with platform.for_this_host():
    jax.jit(lambda x: f(x)).trace(x)  # a new function: a cached trace would not call by_platform
  assert sorted(set(traced)) == ["cpu", "tpu"]


# ----------------------------------------------------------------------------- lowering for TPU / CUDA


FAMILY_OPTIONS = {"softmax": {}, "local": {"window": 32}, "sparse": {"block_size": 32, "pattern": "local"},
                  "linear": {"chunk_size": 32}, "performer": {"num_features": 16, "chunk_size": 32}}


def _export_step(cfg: ModelConfig, platform: str, dtype=jnp.float32, T=128) -> str:
  """StableHLO of one AdamW train step of a tiny LM, lowered for `platform` on this CPU host."""
  model, tx = TransformerLM(cfg), optax.adamw(1e-3)
  tokens = jax.ShapeDtypeStruct((2, T), jnp.int32)
  # Shapes only (an eager init compiles every op on its own: most of this test's time once).
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype), variables["params"])
  batch = {"inputs": tokens, "targets": tokens, "segment_ids": tokens,
           "weights": jax.ShapeDtypeStruct((2, T), jnp.float32)}

  def step(params, opt_state, batch, buffers):
    grads, _ = jax.grad(loss_fn, has_aux=True)(params, batch, model, TrainConfig(), buffers)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  exported = jax.export.export(jax.jit(step), platforms=[platform], disabled_checks=TRITON)(
      params, jax.eval_shape(tx.init, params), batch, variables.get("buffers"))
  return exported.mlir_module()


def _calls(text: str) -> set:
  return set(re.findall(r"custom_call @([\w$.]+)", text))


@pytest.mark.all_platforms
@pytest.mark.parametrize("family", list(FAMILY_OPTIONS))
def test_train_step_lowers_to_the_platform_kernels(family):
  """TPU: splash (Mosaic) for softmax / local / sparse; CUDA: the Pallas Triton kernel for float32 softmax
  (cuDNN needs jax's CUDA plugin to trace, absent on this host); kernelized families: plain XLA."""
  cfg = ModelConfig(num_layers=1, d_model=32, num_heads=2, ffn_dim=64, attention=family,
                    attention_options=FAMILY_OPTIONS[family])
  tpu, cuda = _calls(_export_step(cfg, "tpu")), _calls(_export_step(cfg, "cuda"))
  fused = family in ("softmax", "local", "sparse")
  assert ("tpu_custom_call" in tpu) == fused, tpu
  assert ("__gpu$xla.gpu.triton" in cuda) == (family == "softmax"), cuda


@pytest.mark.all_platforms
def test_moe_train_step_lowers_ragged_on_accelerators_only():
  base = dict(num_layers=1, d_model=32, num_heads=2, ffn_dim=64, num_experts=4, top_k=2)
  for dropless, platforms in ((False, ("tpu",)), (True, ("tpu", "cuda"))):
    cfg = ModelConfig(**base, dropless=dropless)
    for platform in platforms:
      assert ("ragged_dot" in _export_step(cfg, platform, T=32)) == dropless, (platform, dropless)
