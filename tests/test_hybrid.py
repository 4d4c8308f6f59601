"""Hybrid stacks: a family per layer (model.attention_pattern, full_attention_every, family_options).

An empty pattern is today's model bit for bit; decoding a hybrid token by token (a KV cache, a window ring
buffer and recurrent states side by side) equals its parallel causal forward for every decoding family;
the scanned period with unrolled remainder equals the loop; FLOPs sum the layers' families; the command
line trains, resumes, generates and evaluates a hybrid; bad settings are one sentence.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn import cli, flops
from efficient_attn.config import Config, ConfigError, ModelConfig, validate, with_overrides
from efficient_attn.model import TransformerLM, generate, init_decode_states

# Every family that decodes appears in one of the two 6-layer models (sparse has no decoding state: `sample`
# runs it by the parallel forward); B is scanned over its 4-layer period with 2 remainder layers.
PATTERNS = {
    "A": (["local", "softmax", "gla", "mamba2", "deltanet", "gated_deltanet"], False),
    "B": (["linear", "performer", "retnet", "based"], True),
}
OPTIONS = {"local": {"window": 16}, "performer": {"num_features": 16}}


def _hybrid(pattern, scan=False, num_layers=6, d_model=64, **kw):
  return ModelConfig(attention=pattern[0], num_layers=num_layers, d_model=d_model, num_heads=4, ffn_dim=2 * d_model,
                     attention_pattern=tuple(pattern), scan_layers=scan,
                     family_options={f: o for f, o in OPTIONS.items() if f in pattern[1:] and f != pattern[0]},
                     attention_options=OPTIONS.get(pattern[0]), **kw)


def test_an_empty_pattern_is_todays_model_bit_for_bit():
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 256)
  plain = ModelConfig(num_layers=2, d_model=32, num_heads=2, ffn_dim=64)
  same = ModelConfig(num_layers=2, d_model=32, num_heads=2, ffn_dim=64, attention_pattern=("softmax",))
  assert not plain.hybrid and plain.layer(1) is plain and same.hybrid
  outs = []
  for cfg in (plain, same):
    model = TransformerLM(cfg)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
    outs.append((jax.tree.map(np.asarray, variables), np.asarray(jax.jit(model.apply)(variables, tokens))))
  assert jax.tree.structure(outs[0][0]) == jax.tree.structure(outs[1][0])
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])))
  np.testing.assert_array_equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_decoding_a_hybrid_equals_its_parallel_forward(name):
  """6 layers, d 64, T 128: 16 prompt tokens then 112 generated; every layer's own state gives the parallel
  forward's logits at every position."""
  pattern, scan = PATTERNS[name]
  cfg = _hybrid(pattern, scan)
  model = TransformerLM(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 128), 0, 256)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
  families = cfg.layer_families()
  assert set(pattern) <= set(families) and len(families) == 6
  if not scan:  # each layer carries its own family's params: GLA's gate projection only in GLA's layer
    trunk = nn.unbox(variables["params"])["trunk"]
    gated = [i for i in range(6) if any("gate" in k or "alpha" in k for k in trunk[f"block_{i}"]["attention"])]
    assert 2 in gated and 0 not in gated and 1 not in gated, gated
  states = init_decode_states(cfg, 1, 128)
  assert len(states) == 6  # scanned: 4 stacked period states + 2 remainder layers' own
  generated, logits = generate(model, variables, tokens[:, :16], 112)
  parallel = jax.jit(model.apply)(variables, generated)
  np.testing.assert_allclose(logits, parallel[:, :-1], atol=5e-4, rtol=5e-4)


def test_the_scanned_period_with_a_remainder_equals_the_loop():
  pattern = ["local", "softmax", "linear"]
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 32), 0, 256)
  loop_cfg = _hybrid(pattern, False, num_layers=5, d_model=32)
  scan_cfg = _hybrid(pattern, True, num_layers=5, d_model=32)
  loop, scan = TransformerLM(loop_cfg), TransformerLM(scan_cfg)
  lp = nn.unbox(jax.jit(loop.init)(jax.random.PRNGKey(0), tokens)["params"])
  shapes = nn.unbox(jax.eval_shape(scan.init, jax.random.PRNGKey(1), tokens)["params"])
  assert sorted(shapes["trunk"]) == ["block_3", "block_4", "layers"]  # one period scanned once, 2 layers unrolled
  sp = {k: lp[k] for k in ("embed", "final_norm", "unembed")}
  sp["trunk"] = {f"block_{i}": lp["trunk"][f"block_{i}"] for i in (3, 4)}
  sp["trunk"]["layers"] = {f"block_{j}": jax.tree.map(lambda x: x[None], lp["trunk"][f"block_{j}"]) for j in range(3)}
  assert jax.tree.structure(sp) == jax.tree.structure(shapes)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(shapes)))
  np.testing.assert_allclose(jax.jit(scan.apply)({"params": sp}, tokens),
                             jax.jit(loop.apply)({"params": lp}, tokens), atol=1e-5)


def test_flops_sum_the_layers_families():
  T = 256
  hybrid = ModelConfig(num_layers=6, attention_pattern=("local",) * 5 + ("softmax",),
                       family_options={"local": {"window": 32}})
  local = ModelConfig(num_layers=6, attention="local", attention_options={"window": 32})
  soft = ModelConfig(num_layers=6)
  h, lo, s = (flops.model_flops_per_token(m, T) for m in (hybrid, local, soft))
  assert h["attention"] == (5 * lo["attention"] + s["attention"]) / 6
  assert h["dense"] == s["dense"] and h["train"] == 3 * (h["dense"] + h["attention"])
  every = ModelConfig(num_layers=6, attention="local", attention_options={"window": 32}, full_attention_every=3)
  assert every.layer_families() == ("local", "local", "softmax") * 2
  assert flops.model_flops_per_token(every, T)["attention"] == (4 * lo["attention"] + 2 * s["attention"]) / 6


@pytest.mark.parametrize("sets, needle", [
    ({"model.attention_pattern": ["local", "sofmax"]}, "'sofmax' is not a registered attention family; did you"
                                                       " mean 'softmax'?"),
    ({"model.attention_pattern": ["local", "softmax"], "model.family_options.locl.window": 8},
     "model.family_options.locl: no layer uses 'locl'; did you mean 'local'?"),
    ({"model.attention_pattern": ["local", "softmax"], "model.family_options.local.windw": 8},
     "has no option 'windw'; did you mean 'window'?"),
    ({"model.attention_pattern": ["local"], "model.full_attention_every": 2}, "use one of them"),
    ({"model.attention_pattern": ["softmax", "local"], "model.family_options.softmax.chunk_size": 8},
     "softmax is model.attention; set its options as model.attention_options.KEY"),
    ({"model.attention_pattern": ["local", "softmax"], "model.family_options.local.window": 0},
     "model.family_options.local: attention family 'local'"),
])
def test_bad_hybrid_settings_are_one_sentence(sets, needle):
  with pytest.raises(ConfigError, match=None) as e:
    validate(with_overrides(Config(), sets), 1)
  assert needle in str(e.value), str(e.value)


def test_the_command_line_trains_resumes_generates_and_evaluates_a_hybrid(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  sets = ["model.attention_pattern=['gated_deltanet','gated_deltanet','gated_deltanet','softmax']",
          "model.num_layers=4", "model.d_model=32", "model.num_heads=2", "model.ffn_dim=64", "train.batch_size=8",
          "train.seq_len=64", "train.log_every=2", "train.checkpoint_every=2", "train.warmup_steps=1",
          "train.eval_batches=1", "train.schedule=constant"]  # no step count in the program: one train step
  argv = ["train", "--workdir", workdir] + [x for s in sets for x in ("--set", s)]  # for both runs (compile cache)
  assert cli.main(argv + ["--set", "train.steps=2"]) == 0
  stored = json.load(open(os.path.join(workdir, "config.json")))
  assert stored["model.attention_pattern"] == ["gated_deltanet"] * 3 + ["softmax"]
  err = capsys.readouterr().err
  assert "layers: gated_deltanet, gated_deltanet, gated_deltanet, softmax" in err, err
  assert cli.main(argv + ["--set", "train.steps=4"]) == 0
  assert "resumed from step 2" in capsys.readouterr().err
  # A resume with another pattern is refused, naming the key.
  assert cli.main(argv[:-2 * len(sets)] + [x for s in ["model.attention_pattern=['softmax']"] + sets[1:]
                                           for x in ("--set", s)] + ["--set", "train.steps=6"]) == 2
  assert "model.attention_pattern" in capsys.readouterr().err
  assert cli.main(["generate", "--workdir", workdir, "--prompt", "def ", "--set", "sample.max_new_tokens=8"]) == 0
  assert cli.main(["eval", "--workdir", workdir, "--set", "eval.batches=1"]) == 0
  out = capsys.readouterr().out
  assert "val_loss" in out


def test_decode_state_memory_grows_with_context_only_for_the_kv_cache_layers():
  from efficient_attn.model import decode_state_bytes

  cfg = ModelConfig(num_layers=8, d_model=64, num_heads=4, num_kv_heads=2, attention="gated_deltanet",
                    full_attention_every=4)  # Qwen3-Next's 3:1
  short, long = decode_state_bytes(cfg, 2, 256), decode_state_bytes(cfg, 2, 1024)
  kv_per_token = 2 * 2 * 2 * 16 * 4  # batch x (k, v) x kv heads x head dim x float32 bytes, per softmax layer
  assert long["per_family"]["softmax"] - short["per_family"]["softmax"] == 2 * kv_per_token * (1024 - 256)
  assert long["per_family"]["gated_deltanet"] == short["per_family"]["gated_deltanet"] > 0
  assert long["total"] == sum(long["per_family"].values())


def test_an_experiment_variant_can_be_a_pattern():
  from efficient_attn import experiment

  module = experiment.load("equal_compute")
  sets = {"smoke": True, "patterns": {"lin3:1": ["linear", "linear", "linear", "softmax"]},
          "variants": ["softmax", "linear", "lin3:1"], "num_layers": 4}
  cfg = experiment.resolve_config(module, sets)
  m = module._model_config(cfg, "lin3:1")
  assert m.layer_families() == ("linear", "linear", "linear", "softmax")
  steps = [module.steps_for(cfg, v) for v in cfg["variants"]]
  assert steps[1] >= steps[2] >= steps[0]  # the hybrid's FLOPs lie between its two families'
  with pytest.raises(ConfigError, match="'lineer' is not one; did you mean 'linear'"):
    experiment.resolve_config(module, {**sets, "patterns": {"lin3:1": ["lineer", "softmax"]}})


def test_the_hybrid_experiment_smoke_at_equal_flops(tmp_path):
  """One arrangement through both tasks (the smoke's pure-linear one adds compiles, not paths); equal FLOPs
  is checked on the default grid's arithmetic: every arrangement's steps spend softmax's budget."""
  from efficient_attn import experiment, flops

  out = experiment.run("hybrid", str(tmp_path), {"smoke": True, "arrangements": ["1:1"]}, progress=False)
  rows = out["rows"]
  assert [(r["task"], r["arrangement"]) for r in rows] == [("mqar", "1:1"), ("lm", "1:1")]
  lm = rows[1]
  assert lm["layers"] == ["gated_deltanet", "softmax"] and lm["softmax_share"] == 0.5
  assert lm["flops"] > 0 and lm["val_loss"] is not None and rows[0]["accuracy"] is not None
  assert lm["decode_bytes_per_token"] > 0
  summary = open(tmp_path / "summary.md").read()
  assert "| 1:1 | L S | 0.500 |" in summary and "2507.06457" in summary
  assert {os.path.basename(p) for p in out["plots"]} == {"hybrid_recall.png", "hybrid_loss.png"}
  module = experiment.load("hybrid")
  cfg = experiment.resolve_config(module, {})
  for task in ("mqar", "lm"):
    T, B = cfg[f"{task}_seq_len"], cfg[f"{task}_batch_size"]
    per_step = {a: flops.model_flops_per_token(module._model(cfg, a, task), T)["train"] * T * B
                for a in cfg["arrangements"] if module.runs_on(cfg, a, task)}
    budget = per_step["softmax"] * cfg[f"{task}_steps"]
    for a, f in per_step.items():
      assert abs(module._steps(cfg, a, task) * f - budget) <= f, (task, a)
  assert module._steps(cfg, "linear", "lm") > cfg["lm_steps"]  # at T 256 a linear layer is cheaper: more steps


def test_hybrid_runs_each_arrangement_on_the_tasks_its_pattern_fits():
  """MQAR's shallower default model skips 7:1 (8 layers) and local5:1 (6), says so in the table; an
  arrangement that fits no task is one sentence."""
  from efficient_attn import experiment

  module = experiment.load("hybrid")
  cfg = experiment.resolve_config(module, {})
  assert cfg["mqar_num_layers"] < 6 <= cfg["num_layers"] == 8
  names = module.variants(cfg)
  assert [n for n in names if n.startswith("lm-")] == ["lm-" + module._id(a) for a in cfg["arrangements"]]
  assert [n for n in names if n.startswith("mqar-")] == ["mqar-linear", "mqar-3to1", "mqar-1to1", "mqar-softmax"]
  assert module._model(cfg, "3:1", "mqar").layer_families() == ("gated_deltanet",) * 3 + ("softmax",)
  rows = [{"arrangement": "7:1", "task": "lm", "layers": ["gated_deltanet"] * 7 + ["softmax"], "softmax_share": 0.125,
           "val_loss": 2.5, "val_bpb": 3.6, "steps": 10, "step_time_s": 0.1, "decode_bytes": 2 ** 20,
           "decode_bytes_per_token": 512.0}]
  assert "| 7:1 | L L L L L L L S | 0.125 | not run: needs 8 layers |" in module.summarize(cfg, rows)
  recall = [{"arrangement": a, "task": "mqar", "softmax_share": x, "accuracy": y}
            for a, x, y in (("linear", 0, 0.2), ("3:1", 0.25, 0.6), ("softmax", 1, 0.595))]
  assert "linear 20.0% -> 3:1 60.0% -> softmax 59.5%; it rises with the share" in module.findings(recall)
  recall[1]["accuracy"] = 0.1
  assert "does not rise steadily" in module.findings(recall)
  with pytest.raises(ConfigError, match="arrangement 7:1 needs at least 8 layers"):
    experiment.resolve_config(module, {"tasks": ["mqar"], "arrangements": ["7:1"]})
