"""Context parallelism in a model: the `context` mesh axis trains with one device's losses.

The trainer lays every batch out once (`context.lay_out_example`), `attend` splits each attention call
over the axis (`context.split_call`), and everything else (embeddings, norms, FFN, MoE, loss) is
per token, so a 10-step run on fsdp 2 x context 2 x tensor 2 (and a switch MoE on `expert` 2 x
`context` 4) logs the same losses as one device. Bad settings are one sentence before anything compiles.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn import attention
from efficient_attn.attention import context
from efficient_attn.bench.attention import bench_attention
from efficient_attn.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, TrainConfig, validate
from efficient_attn.train import train


def _config(attention_name, mesh, **model_kw):
  model = ModelConfig(attention=attention_name, num_layers=2, d_model=32, num_heads=4, ffn_dim=64, **model_kw)
  tr = TrainConfig(steps=10, batch_size=4, seq_len=64, learning_rate=3e-3, warmup_steps=2, log_every=1,
                   checkpoint_every=10, eval_batches=1)
  return Config(model=model, train=tr, data=DataConfig(), mesh=mesh)


def _losses(cfg, workdir, devices):
  train(cfg, str(workdir), devices=jax.devices()[:devices], progress=False)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return np.array([r["loss"] for r in rows if "loss" in r]), [r["val_loss"] for r in rows if "val_loss" in r]


# (family, model settings, mesh): exact softmax (ring attention) on fsdp 2 x context 2 x tensor 2 in the contiguous
# layout (the split composes with ZeRO-3 params and tensor-split heads); the gated delta rule with a switch MoE
# (top-1, no token dropped at capacity factor 4) on expert 2 x context 4, zigzag.
RUNS = [
    ("softmax", {}, MeshConfig(data=1, fsdp=2, context=2, tensor=2, context_layout="contiguous")),
    ("gated_deltanet", {"num_experts": 4, "top_k": 1, "capacity_factor": 4.0, "attention_options": {"chunk_size": 8}},
     MeshConfig(data=1, context=4, expert=2)),
]


@pytest.mark.parametrize("name, model_kw, mesh", RUNS, ids=[r[0] for r in RUNS])
def test_training_split_over_context_logs_one_devices_losses(tmp_path, name, model_kw, mesh):
  want, want_val = _losses(_config(name, MeshConfig(data=1), **model_kw), tmp_path / "one", 1)
  got, got_val = _losses(_config(name, mesh, **model_kw), tmp_path / "split",
                         mesh.fsdp * mesh.context * mesh.tensor * mesh.expert)
  assert len(got) == len(want) == 10
  assert np.max(np.abs(got - want)) < 1e-4, (got, want)
  assert want[-1] < want[0] - 0.5  # it learns, so the equality is about a moving model
  assert np.allclose(got_val, want_val, atol=1e-4)


def test_lay_out_example_permutes_every_array_and_adds_positions():
  seg = np.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * 16], np.int32)
  tokens = np.arange(32, dtype=np.int32).reshape(2, 16)
  out = context.lay_out_example({"inputs": tokens, "segment_ids": seg}, 4, "zigzag")
  for k, x in (("inputs", tokens), ("segment_ids", seg)):
    np.testing.assert_array_equal(out[k], np.asarray(context.to_layout(x, 4, "zigzag")))
  want_positions = np.array([list(range(5)) + list(range(7)) + list(range(4)), list(range(16))])
  np.testing.assert_array_equal(np.asarray(context.from_layout(out["positions"], 4, "zigzag")), want_positions)
  assert context.lay_out_example({"inputs": tokens}, 1, "zigzag") == {"inputs": tokens}  # one shard: as it was


def test_bad_context_settings_are_one_sentence_before_compiling():
  def refused(cfg, *words):
    with pytest.raises(ConfigError) as e:
      validate(cfg, 8)
    msg = str(e.value)
    assert msg.count(". ") == 0 and all(w in msg for w in words), msg

  cfg = _config("gla", MeshConfig(data=2, context=4))
  assert validate(cfg, 8)["context"] == 4
  refused(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=60)), "T=60", "multiple of 8")
  refused(dataclasses.replace(cfg, mesh=MeshConfig(data=2, context=4, context_layout="striped")), "striped")
  refused(dataclasses.replace(cfg, mesh=MeshConfig(data=1, context=16)), "16")


def test_a_family_without_a_context_rule_is_refused_by_name():
  def mine(q, k, v, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None):
    return attention.softmax_attention(q, k, v, is_causal=is_causal, segment_ids=segment_ids)

  attention.register(attention.Family(name="no_context_rule", fn=mine), replace=True)
  try:
    cfg = _config("no_context_rule", MeshConfig(data=2, context=4))
    with pytest.raises(ConfigError, match="'no_context_rule' has no context-parallel rule"):
      validate(cfg, 8)
    validate(dataclasses.replace(cfg, mesh=MeshConfig(data=4)), 4)  # without the axis it is fine
    mesh = jax.make_mesh((4,), ("context",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    q = jnp.zeros((1, 16, 2, 8))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="'no_context_rule' has no context-parallel rule"):
      attention.attend("no_context_rule", q, q, q, is_causal=True)
  finally:
    attention.FAMILIES.pop("no_context_rule")
    attention.ATTENTION.pop("no_context_rule")


def test_bench_attention_splits_over_context_and_reports_bytes_moved():
  rows = bench_attention({"variants": ["jax_nn", "gla"], "seq_lens": [64, 128], "mesh.context": 2, "rounds": 1,
                          "min_time": 0.0, "head_dim": 8, "num_heads": 2, "num_kv_heads": 2}, progress=False)
  by = {(r["variant"], r["seq_len"]): r for r in rows}
  assert by["jax_nn", 64]["context"] == 1 and by["jax_nn", 64]["collective_bytes"] == 0
  assert by["gla", 64]["context"] == 2 and by["gla", 64]["collectives"].get("all-gather", 0) > 0
  # state passing: the same bytes whatever the length
  assert by["gla", 64]["collective_bytes"] == by["gla", 128]["collective_bytes"]
  with pytest.raises(ConfigError, match="mesh.context=16 needs 16 devices"):
    bench_attention({"variants": ["gla"], "seq_lens": [64], "mesh.context": 16}, progress=False)


# Small options every family runs with at T = 64 over 4 zigzag shards (8-token pieces).
SMALL = {"local": {"window": 8}, "sparse": {"block_size": 8}, "based": {"window_size": 8, "feature_dim": 4},
         "performer": {"num_features": 16}, "linear": {"chunk_size": 4}, "retnet": {"chunk_size": 4},
         "gla": {"chunk_size": 4}, "mamba2": {"chunk_size": 4}, "deltanet": {"chunk_size": 4},
         "gated_deltanet": {"chunk_size": 4}}


@pytest.mark.parametrize("name, packed", [(n, n not in ("linear", "retnet", "performer")) for n in [
    "softmax", "local", "sparse", "linear", "performer", "based", "retnet", "gla", "mamba2", "deltanet",
    "gated_deltanet"]])
def test_every_family_through_attend_on_data_2_x_context_4(name, packed):
  """`attend` under a (data 2, context 4) mesh, inputs laid out zigzag: one device's output and q/k/v gradients
  (packed documents, or one sequence a row: the fixed decays of linear / retnet then vary over nothing)."""
  B, T, N, K, H = 2, 64, 4, 2, 8
  family = attention.get(name)
  options = family.make_options(SMALL.get(name))
  shape = attention.Shape(T, T, N, K, H, True)
  kw = family.call_kwargs(options, shape)
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  if family.buffers is not None:
    kw.update(family.buffers(keys[0], options, shape))
  if family.inputs is not None:
    spec = family.input_params(options, shape, N * H)
    params = {n: init(k, s, jnp.float32) for (n, (s, _, init)), k in zip(sorted(spec.items()), jax.random.split(keys[1], len(spec)))}
    kw.update(family.inputs(params, jax.random.normal(keys[2], (B, T, N * H)), options, shape))
  q = jax.random.normal(keys[3], (B, T, N, H))
  k, v = (jax.random.normal(key, (B, T, K, H)) for key in keys[4:])
  seg = jnp.asarray(np.repeat([[1, 2, 3, 4]], B, 0).repeat([13, 20, 19, 12], axis=1), jnp.int32) if packed else None
  ct = jax.random.normal(keys[0], (B, T, N, H))
  per_token = {n: x for n, x in kw.items() if isinstance(x, jax.Array) and x.shape[:2] == (B, T)}
  fixed = {n: x for n, x in kw.items() if n not in per_token}

  def loss(q, k, v, split):
    lay, unlay = ((lambda x: context.to_layout(x, 4, "zigzag"), lambda x: context.from_layout(x, 4, "zigzag"))
                  if split else (lambda x: x, lambda x: x))
    out = attention.attend(name, lay(q), lay(k), lay(v), is_causal=True, segment_ids=None if seg is None else lay(seg),
                           **{n: lay(x) for n, x in per_token.items()}, **fixed)
    return jnp.sum(unlay(out) * ct), unlay(out)

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  (_, want), want_grads = jax.jit(grad, static_argnums=3)(q, k, v, False)
  mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:8])
  with jax.set_mesh(mesh):
    (_, got), got_grads = jax.jit(grad, static_argnums=3)(q, k, v, True)
  for what, a, b in zip(("out", "dq", "dk", "dv"), (got, *got_grads), (want, *want_grads)):
    err = float(jnp.max(jnp.abs(a - b)))
    assert err <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(b)))), (name, what, err)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_ring_attention_lowers_for_accelerators_with_permutes_only(platform):
  """The ring as TPU / GPU would run it (jax.export, no chip needed): collective-permutes of K/V blocks, no
  all-gather; each step is the XLA blockwise softmax (no fused kernel: they return no log-sum-exp)."""
  mesh = jax.make_mesh((4,), ("context",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "context"))
  x = jax.ShapeDtypeStruct((1, 256, 2, 16), jnp.bfloat16, sharding=split)
  loss = lambda q, k, v: jnp.sum(attention.attend("softmax", q, k, v, is_causal=True).astype(jnp.float32))  # noqa: E731
  with jax.set_mesh(mesh):
    text = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform])(x, x, x).mlir_module()
  assert "collective_permute" in text and "all_gather" not in text


def test_bench_moe_splits_sequences_over_context():
  from efficient_attn.bench.moe import bench_moe

  settings = {"batch": 2, "seq_len": 32, "d_model": 16, "hidden_dim": 32, "num_experts": [4],
              "variants": ["dense", "switch_cf1.25"], "rounds": 1, "repeats": 1, "min_time": 0.0}
  one, split = bench_moe(settings, progress=False), bench_moe({**settings, "mesh.context": 2}, progress=False)
  assert [r["context"] for r in one] == [1, 1] and [r["context"] for r in split] == [2, 2]
  assert one[1]["collective_bytes"] == 0 < split[1]["collective_bytes"]
  assert split[1]["argument_bytes"] < one[1]["argument_bytes"]  # each device holds half of every sequence
  with pytest.raises(ConfigError, match="mesh.context=3 must be a positive integer dividing seq_len=32"):
    bench_moe({**settings, "mesh.context": 3}, progress=False)


def test_a_resume_may_change_the_context_split_but_not_the_model(tmp_path):
  """The split is exact in any layout, so a workdir trained on context 4 resumes on 2 (checkpoints reshard);
  a different model is still refused."""
  from efficient_attn import reliability
  from efficient_attn.config import CONFIG_JSON, save_config_json

  cfg = _config("gla", MeshConfig(data=2, context=4))
  save_config_json(cfg, str(tmp_path / CONFIG_JSON))
  resumed = dataclasses.replace(cfg, mesh=MeshConfig(data=4, context=2, context_layout="contiguous"))
  assert reliability.check_same_run(str(tmp_path), resumed, True) is None
  other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=64))
  with pytest.raises(ConfigError, match="model.d_model=32 there, 64 now"):
    reliability.check_same_run(str(tmp_path), other, True)
