"""FLOPs accounting (efficient_attn/flops.py) against XLA's own count and independent references.

How XLA counts (checked by `test_xla_counts_a_loop_body_once`): `compiled.cost_analysis()["flops"]`
counts a while / scan / fori_loop / lax.map body ONCE, whatever its trip count, and counts
elementwise ops (max, sum, divide, compare, where, elu...) as FLOPs too, exp as a
"transcendental". So:
- the formulas are compared with XLA on configs whose loops run once, or whose loops are
  negligible: linear / Performer causal scan only a [B, K, M, H] state add over chunks;
- the chunked softmax's multi-tile configs count the executed tiles at run time with
  softmax_chunked.py's `_TILE_HOOK` and multiply by XLA's count of a one-tile config;
- tolerance: XLA / formula in [0.98, 1.15] for one attention core (measured 1.03-1.11:
  elementwise work over matmul work, largest for linear's elu features at H=32) and
  [0.97, 1.10] / [0.90, 1.12] for a whole model forward / train step (measured 1.00-1.06
  forward, 0.92-1.06 train). The "ideal" count of causal xla softmax is half of what XLA
  reports, so a formula that forgot the executed work fails these bounds.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficient_attn import attention as A
from efficient_attn import flops, measure
from efficient_attn.attention import masks
from efficient_attn.attention import softmax_chunked
from efficient_attn.attention import sparse as sparse_lib
from efficient_attn.config import ModelConfig
from efficient_attn.model import TransformerLM

from reference import visibility

B, N, H = 2, 2, 32
ATTN_TOL = (0.98, 1.15)
FWD_TOL = (0.97, 1.10)
TRAIN_TOL = (0.90, 1.12)


def xla_flops(fn, *args) -> float:
  return measure.xla_flops(measure.compile_fn(fn, *args))


def test_xla_counts_a_loop_body_once():
  """The premise of the comparisons below: n trips of a 64³ matmul are reported as one."""
  a = jnp.ones((64, 64), jnp.float32)
  one = xla_flops(lambda a: a @ a, a)
  assert one == 2 * 64 ** 3
  for n in (2, 8):
    scanned = xla_flops(lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=n)[0], a)
    looped = xla_flops(lambda a: jax.lax.fori_loop(0, n, lambda i, c: c @ a, a), a)
    assert one <= scanned < 1.01 * one and one <= looped < 1.01 * one


# (kind, call options, attention_flops options); T = 256: the chunked softmax is one 256 x 256 tile.
FAMILIES = [
    ("softmax", {"implementation": "xla"}, {"implementation": "xla"}),
    ("softmax", {"implementation": "chunked"}, {"implementation": "chunked"}),
    ("local", {"window": 64}, {"window": 64}),
    ("local", {"window": 100, "block_size": 32}, {"window": 100, "block_size": 32}),
    ("sparse", "sparse", {"block_size": 32}),
    ("linear", {}, {}),
    ("linear", {"chunk_size": 64, "feature_map": "relu"}, {"chunk_size": 64, "feature_map": "relu"}),
    ("performer", "performer", {"num_features": 64}),
]


def _call_options(kind, opts, T):
  """The family's call keywords as the model builds them (prepared options + buffers)."""
  if isinstance(opts, dict):
    return opts
  family = A.get(kind)
  options = family.make_options({"sparse": {"block_size": 32}, "performer": {"num_features": 64}}[opts])
  shape = A.Shape(T, T, N, N, H, True)
  kw = family.call_kwargs(options, shape)
  if family.buffers is not None:
    kw.update(family.buffers(jax.random.PRNGKey(0), options, shape))
  return kw


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,call,options", FAMILIES, ids=lambda x: x if isinstance(x, str) else None)
def test_attention_executed_matches_xla(kind, call, options, causal):
  T = 256
  q = jnp.ones((B, T, N, H), jnp.float32)
  fn = functools.partial(A.attend, kind, is_causal=causal, **_call_options(kind, call, T))
  measured = xla_flops(lambda q, k, v: fn(q, k, v), q, q, q)
  f = flops.attention_flops(kind, T, num_heads=N, head_dim=H, causal=causal, **options)
  ratio = measured / (f["executed"] * B * T)
  assert ATTN_TOL[0] <= ratio <= ATTN_TOL[1], (kind, causal, ratio)
  assert f["ideal"] <= f["executed"] * (1 + 1e-12)


def test_gqa_and_longer_sequences_match_xla():
  """T = 512 (no loops outside the chunked softmax) and grouped kv heads (N = 4, K = 2)."""
  T, N4, K = 512, 4, 2
  q, kv = jnp.ones((B, T, N4, H)), jnp.ones((B, T, K, H))
  for kind, kw in (("softmax", {"implementation": "xla"}), ("local", {"window": 128}), ("linear", {})):
    for causal in (False, True):
      measured = xla_flops(lambda q, k, v: A.attend(kind, q, k, v, is_causal=causal, **kw), q, kv, kv)
      f = flops.attention_flops(kind, T, num_heads=N4, head_dim=H, num_kv_heads=K, causal=causal, **kw)
      ratio = measured / (f["executed"] * B * T)
      assert ATTN_TOL[0] <= ratio <= ATTN_TOL[1], (kind, causal, ratio)


@pytest.mark.parametrize("T,causal", [(512, True), (512, False), (768, True), (384, True)])
def test_chunked_softmax_counts_executed_tiles(T, causal, monkeypatch):
  """Multi-tile chunked softmax: tiles seen at run time x XLA's count of one 256 x 256 tile."""
  q1 = jnp.ones((B, 256, N, H), jnp.float32)
  one_tile = xla_flops(lambda q, k, v: A.softmax_attention(q, k, v, is_causal=causal, implementation="chunked"),
                       q1, q1, q1)
  seen = []
  monkeypatch.setattr(softmax_chunked, "_TILE_HOOK", lambda name, i, j: seen.append((int(i), int(j))))
  q = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, N, H)), jnp.float32)
  fn = jax.jit(lambda q: A.softmax_attention(q, q, q, is_causal=causal, implementation="chunked"))
  jax.block_until_ready(fn(q))
  jax.effects_barrier()
  f = flops.attention_flops("softmax", T, num_heads=N, head_dim=H, causal=causal, implementation="chunked")
  assert f["executed"] * T == pytest.approx(len(seen) * 4 * N * H * 256 * 256)
  ratio = len(seen) * one_tile / (f["executed"] * B * T)
  assert ATTN_TOL[0] <= ratio <= ATTN_TOL[1]
  if causal and T % 256 == 0:  # about half the tiles: n(n+1)/2 of n²
    n = T // 256
    assert len(seen) == n * (n + 1) // 2


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 37, 128, 300, 1000])
def test_ideal_counts_visible_pairs(window, causal):
  """Ideal softmax / local FLOPs = 4·N·H x pairs of the float64 reference's visibility matrix."""
  T = 300
  pairs = visibility(1, 1, T, T, is_causal=causal, window=window).sum()
  local = flops.attention_flops("local", T, num_heads=N, head_dim=H, causal=causal, window=window)
  assert local["ideal"] * T == pytest.approx(4 * N * H * pairs)
  full = flops.attention_flops("softmax", T, num_heads=N, head_dim=H, causal=causal, implementation="xla")
  assert full["ideal"] * T == pytest.approx(4 * N * H * visibility(1, 1, T, T, is_causal=causal).sum())
  assert full["executed"] == 4 * N * H * T  # the xla path computes all T x S logits
  assert local["executed"] >= local["ideal"]


def test_sparse_ideal_counts_the_layout():
  T, bs = 512, 32
  layout = masks.bigbird_layout(T // bs, T // bs, window=3, num_global=1, num_random=2, seed=0)
  for causal in (False, True):
    dense_mask = masks.layout_to_mask(layout, bs) & visibility(1, 1, T, T, is_causal=causal)[0, 0]
    f = flops.attention_flops("sparse", T, num_heads=N, head_dim=H, causal=causal, block_size=bs, num_random=2)
    assert f["ideal"] * T == pytest.approx(4 * N * H * dense_mask.sum())
    given = sparse_lib.layout_flops(layout, bs, A.Shape(T, T, N, N, H, causal))
    assert given == pytest.approx({k: f[k] for k in ("ideal", "executed")})
  # One dense block row (a global query block) costs that row only, not every row: executed < 2 x ideal.
  assert f["ideal"] < f["executed"] < 2 * f["ideal"]


def test_ideal_below_executed_where_work_is_wasted():
  T = 1024
  kw = dict(num_heads=N, head_dim=H)
  xla = flops.attention_flops("softmax", T, causal=True, implementation="xla", **kw)
  assert xla["executed"] / xla["ideal"] == pytest.approx(2 * T / (T + 1))
  chunked = flops.attention_flops("softmax", T, causal=True, implementation="chunked", **kw)
  assert xla["ideal"] == chunked["ideal"] < chunked["executed"] < xla["executed"]
  for kind in ("softmax", "linear", "performer"):
    full = flops.attention_flops(kind, T, causal=False, **({"implementation": "xla"} if kind == "softmax" else {}),
                                 **kw)
    assert full["ideal"] == full["executed"]
  for kind in ("linear", "performer"):  # full chunk x chunk products, causal half needed
    causal = flops.attention_flops(kind, T, causal=True, **kw)
    assert causal["ideal"] < causal["executed"]
  # Performer = linear core with M features + the feature projections 2·M·H for q and k.
  lin = flops.attention_flops("linear", T, causal=False, **kw)
  perf = flops.attention_flops("performer", T, causal=False, num_features=H, **kw)
  assert perf["ideal"] - lin["ideal"] == 2 * H * H * (N + N)


SMALL = ModelConfig(num_layers=2, d_model=64, num_heads=2, ffn_dim=256, vocab_size=256)
SMALL_OPTIONS = {"local": {"window": 64}, "sparse": {"block_size": 32}, "performer": {"num_features": 32}}


def family(kind, m=SMALL):
  return dataclasses.replace(m, attention=kind, attention_options=SMALL_OPTIONS.get(kind))


MODELS = {
    "softmax_xla": (SMALL, 128),  # T·S < CHUNKED_MIN_TS: the model runs the xla path
    "softmax_chunked_gqa_swiglu": (dataclasses.replace(SMALL, num_heads=4, num_kv_heads=2,
                                                       ffn_activation="swiglu"), 256),
    "local": (family("local"), 128),
    "sparse": (family("sparse"), 128),
    "linear": (family("linear"), 128),
    "performer": (family("performer"), 128),
    "moe_cf2": (dataclasses.replace(SMALL, num_experts=4, capacity_factor=2.0), 128),
    "moe_dropless_top2": (dataclasses.replace(SMALL, num_experts=4, top_k=2, dropless=True), 128),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_flops_match_xla(name):
  m, T = MODELS[name]
  model = TransformerLM(m)
  tokens = jnp.zeros((B, T), jnp.int32)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens))

  def loss(p, t):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, t), t).mean()

  f = flops.model_flops_per_token(m, T)
  fwd = xla_flops(model.apply, params, tokens) / (B * T)
  train = xla_flops(jax.value_and_grad(loss), params, tokens) / (B * T)
  assert FWD_TOL[0] <= fwd / f["executed_forward"] <= FWD_TOL[1], fwd / f["executed_forward"]
  assert TRAIN_TOL[0] <= train / f["executed_train"] <= TRAIN_TOL[1], train / f["executed_train"]
  assert train / fwd == pytest.approx(3.0, rel=0.12)  # backward ≈ 2 x forward
  assert f["train"] == 3 * f["forward"] and f["forward"] == f["dense"] + f["attention"]
  assert f["forward"] <= f["executed_forward"]


def test_dense_part_is_twice_the_active_params():
  for m in (SMALL, dataclasses.replace(SMALL, num_experts=4, top_k=2, moe_every=2, ffn_activation="swiglu")):
    f = flops.model_flops_per_token(m, 128)
    norms = 2 * m.d_model * m.num_layers
    assert f["dense"] == 2 * (flops.active_params(m)["active"] - norms) + 2 * m.d_model * m.vocab_size


def test_moe_ideal_and_executed():
  moe = dataclasses.replace(SMALL, num_experts=4)
  dropless = flops.model_flops_per_token(dataclasses.replace(moe, dropless=True), 256)
  assert dropless["executed_dense"] == dropless["dense"]
  cf2 = flops.model_flops_per_token(dataclasses.replace(moe, capacity_factor=2.0), 256)
  per_expert = 4 * moe.d_model * moe.ffn_dim
  # C = 2·256/4 = 128 slots per expert: 2 expert MLPs per token instead of 1, in each of the 2 layers.
  assert cf2["executed_dense"] - cf2["dense"] == pytest.approx(2 * per_expert)
  assert cf2["dense"] == dropless["dense"]


def test_steps_for_budget_equalises_compute():
  T, batch = 512, 8
  budget = 5e13
  spent = {}
  for kind in A.names():
    m = dataclasses.replace(ModelConfig(), attention=kind)
    per_step = flops.model_flops_per_token(m, T)["train"] * T * batch
    steps = flops.steps_for_budget(budget, m, T, batch)
    assert abs(steps * per_step - budget) <= per_step / 2
    spent[kind] = (steps, per_step)
  assert max(s * p for s, p in spent.values()) - min(s * p for s, p in spent.values()) <= max(
      p for _, p in spent.values())
  assert spent["local"][0] > spent["softmax"][0]  # a cheaper family trains for more steps
  assert flops.steps_for_budget(0, ModelConfig(), T, batch) == 0


@pytest.mark.parametrize("call,words", [
    (lambda: flops.attention_flops("flash", 256, num_heads=2, head_dim=32), ["'flash'", "softmax"]),
    (lambda: flops.attention_flops("sparse", 100, num_heads=2, head_dim=32), ["length 100", "block_size=64"]),
    (lambda: flops.attention_flops("softmax", 256, num_heads=4, head_dim=32, num_kv_heads=3), ["num_kv_heads=3"]),
    (lambda: flops.attention_flops("softmax", 256, num_heads=2, head_dim=32, implementation="pallas"),
     ["implementation"]),
    (lambda: flops.attention_flops("linear", 256, num_heads=2, head_dim=32, feature_map="tanh"), ["tanh"]),
    (lambda: flops.attention_flops("local", 0, num_heads=2, head_dim=32), ["seq_len"]),
    (lambda: flops.attention_flops("sparse", 256, num_heads=2, head_dim=32, pattern="dense"), ["pattern"]),
    (lambda: flops.attention_flops("local", 256, num_heads=2, head_dim=32, windw=3), ["windw", "window"]),
    (lambda: flops.model_flops_per_token(dataclasses.replace(SMALL, attention="nope"), 128), ["'nope'"]),
    (lambda: flops.steps_for_budget(-1.0, SMALL, 128, 8), ["budget_flops"]),
    (lambda: flops.steps_for_budget(1e12, SMALL, 128, 0), ["batch_size"]),
])
def test_bad_input(call, words):
  with pytest.raises(ValueError) as err:
    call()
  for word in words:
    assert word in str(err.value)


def test_textbook_count_is_kept():
  m = ModelConfig()
  assert flops.textbook_flops_per_token(m, 256) == 6.0 * flops.active_params(m)["active"] + 12.0 * 4 * 256 * 256
  assert flops.mfu(1e9, 1e3, 2, 1e12) == pytest.approx(0.5)


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA A100-SXM4-40GB", 312e12), ("TPU v5 lite", 197e12),
                                        ("TPU v5p", 459e12), ("TPU v4", 275e12), ("NVIDIA A10G", None),
                                        ("Tesla V100-SXM2-16GB", None)])
def test_spec_peaks_by_device_kind(kind, peak):
  assert flops.spec_peak(kind) == peak  # an unlisted kind is unknown, never a neighbour's number


def test_mfu_is_null_with_a_reason_when_it_cannot_be_trusted():
  assert flops.honest_mfu(1e9, 1e3, 2, 1e12) == (pytest.approx(0.5), None)
  value, note = flops.honest_mfu(1e9, 1e3, 1, 1e11)  # 10x the peak: the peak was measured low
  assert value is None and "10.00 > 1" in note
  value, note = flops.honest_mfu(1e9, 1e3, 1, 1e12, loads=(1.0, 7.5), cores=2)
  assert value is None and "load average 7.5 > 2 cores" in note
  assert flops.honest_mfu(1e9, 1e3, 1, 1e12, loads=(None, 1.9), cores=2)[0] == pytest.approx(1.0)
  value, note = flops.honest_mfu(1e9, 1e3, 1, None)
  assert value is None and "unknown" in note


def test_cpu_peak_is_measured_once_with_its_load(monkeypatch):
  monkeypatch.delenv(flops.PEAK_ENV, raising=False)  # the suite sets one (tests/conftest.py)
  flops.peak_flops_per_device.cache_clear()
  peak, source = flops.peak_flops_per_device("float32")
  assert peak > 1e8 and "measured" in source
  assert flops.peak_flops_per_device("float32") == (peak, source)  # cached per process
  assert flops.measured_load("float32") >= 0.0


def test_peak_from_the_environment(monkeypatch):
  flops.peak_flops_per_device.cache_clear()
  monkeypatch.setenv(flops.PEAK_ENV, "2.5e11")
  assert flops.peak_flops_per_device("float32") == (2.5e11, "EFFICIENT_ATTN_PEAK_FLOPS=2.5e11")
  for bad in ("fast", "-1", "inf"):
    flops.peak_flops_per_device.cache_clear()
    monkeypatch.setenv(flops.PEAK_ENV, bad)
    with pytest.raises(ValueError, match="must be a positive number of FLOP/s per device"):
      flops.peak_flops_per_device("float32")
  flops.peak_flops_per_device.cache_clear()


def test_a_bad_peak_is_one_sentence_before_anything_runs(tmp_path, monkeypatch, capsys):
  from efficient_attn import cli

  monkeypatch.setenv(flops.PEAK_ENV, "fast")
  assert cli.main(["train", "--workdir", str(tmp_path / "run"), "--set", "train.steps=2"]) == 2
  err = capsys.readouterr().err
  assert err == "efficient-attn: error: EFFICIENT_ATTN_PEAK_FLOPS='fast' must be a positive number of FLOP/s per" \
      " device (e.g. 1.5e11).\n", err
  assert not os.path.exists(tmp_path / "run")
