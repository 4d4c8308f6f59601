"""The synthetic-task experiments (listops, mqar) and their shared training loop.

Each runs end to end at smoke=true and writes rows, table and plots; a rerun
resumes without training; MQAR and ListOps split over two devices (mesh.context=2) train to
the same losses; ListOps gives every family the same training FLOPs (within one
step); bad settings are one ConfigError sentence, exit 2 on the CLI.
"""

import json
import os

import pytest

from efficient_attn import cli, experiment, flops
from efficient_attn.config import ConfigError

# Loading registers the experiments' package, so `efficient_attn._experiments.*` imports below work.
listops, mqar = experiment.load("listops"), experiment.load("mqar")


def _run(name, workdir, **overrides):
  return experiment.run(name, str(workdir), {"smoke": True, **overrides}, progress=False)


def _check_outputs(workdir, out, num_rows):
  lines = open(os.path.join(workdir, "results.jsonl")).read().splitlines()
  assert [json.loads(x) for x in lines] == out["rows"] and len(lines) == num_rows
  summary = open(os.path.join(workdir, "summary.md")).read()
  assert summary == out["summary"]
  assert out["plots"] and all(os.path.getsize(p) > 5000 for p in out["plots"])
  return summary


def _check_row(r, steps):
  assert r["steps"] == steps == r["curve_step"][-1] == r["eval_curve_step"][-1]
  assert 0.0 <= r["accuracy"] <= 1.0 and r["eval_loss"] > 0 and r["loss"] > 0
  assert r["tokens_per_sec"] > 0 and r["memory_bytes"] > 0 and r["time_s"] > 0 and r["flops"] > 0


def _no_rerun(module, monkeypatch):
  def fail(*args):
    raise AssertionError("a finished variant was trained again")

  monkeypatch.setattr(module, "run_variant", fail)


def test_paper_tables():
  from efficient_attn._experiments import _papers

  assert _papers.LRA_TABLE1["Transformer"] == 36.37
  assert set(_papers.LRA_TABLE1) >= {"Performer", "Linear Trans.", "BigBird", "Local Attention"}
  assert "MQAR" in _papers.ZOOLOGY_NOTE and len(_papers.ZOOLOGY_NOTE) > 200


@pytest.mark.slow
def test_listops_smoke_resume(tmp_path, monkeypatch):
  from efficient_attn._experiments._papers import LRA_TABLE1

  out = _run("listops", tmp_path)
  families = listops.SMOKE["families"]
  summary = _check_outputs(tmp_path, out, len(families))
  assert [r["variant"] for r in out["rows"]] == families
  plan = listops.plan(experiment.resolve_config(listops, {"smoke": True}))
  for r in out["rows"]:
    _check_row(r, plan[r["family"]][0])
    assert r["flops"] == pytest.approx(r["steps"] * r["flops_per_step"])
    assert f"| {r['family']} | {r['lra_row']} | {LRA_TABLE1[r['lra_row']]:.2f} | {100 * r['accuracy']:.2f} |" in summary
  majority = out["rows"][0]["majority_accuracy"]
  assert 0.1 <= majority <= 1.0 and f"{100 * majority:.2f}%" in summary
  assert f"Sparse Trans. row, {LRA_TABLE1['Sparse Trans.']:.2f}" in summary  # the LRA row we do not map
  _no_rerun(listops, monkeypatch)
  assert _run("listops", tmp_path)["rows"] == out["rows"]


@pytest.mark.slow
def test_mqar_smoke_resume(tmp_path, monkeypatch):
  from efficient_attn._experiments._papers import MQAR_PUBLISHED, MQAR_PUBLISHED_NOTE, ZOOLOGY_NOTE

  out = _run("mqar", tmp_path)
  cfg = experiment.resolve_config(mqar, {"smoke": True})
  names = [f"{f}-d{w}" for f in cfg["families"] for w in cfg["widths"]]
  summary = _check_outputs(tmp_path, out, len(names))
  assert [r["variant"] for r in out["rows"]] == names
  for r in out["rows"]:
    _check_row(r, cfg["steps"])
    assert f"| {r['family']} | {100 * r['accuracy']:.1f} |" in summary
  assert ZOOLOGY_NOTE in summary and "| family | d=16 | published: source; setting; outcome |" in summary
  assert MQAR_PUBLISHED_NOTE in summary and "; ".join(MQAR_PUBLISHED["softmax"]) in summary
  _no_rerun(mqar, monkeypatch)
  assert _run("mqar", tmp_path)["rows"] == out["rows"]


@pytest.mark.slow
@pytest.mark.parametrize("name, family", [("mqar", "linear"), ("listops", "softmax")])
def test_split_over_two_devices_gives_the_same_losses(tmp_path, name, family):
  # MQAR on linear attention (state passing, one sequence a row); ListOps' encoder on softmax (the ring,
  # bidirectional, padding as segment 0, a mean pool over laid-out tokens)
  rows = {P: _run(name, tmp_path / f"context{P}", families=[family], **{"mesh.context": P})["rows"]
          for P in (1, 2)}
  (one,), (two,) = rows[1], rows[2]
  for key in ("loss", "eval_loss"):
    assert two[key] == pytest.approx(one[key], abs=1e-4), key
  assert two["curve_loss"] == pytest.approx(one["curve_loss"], abs=1e-4) and two["accuracy"] == one["accuracy"]


@pytest.mark.parametrize("overrides", [{}, {"smoke": True}, {"budget_flops": 3e12, "max_length": 256}])
def test_listops_equal_compute(overrides):
  cfg = experiment.resolve_config(listops, overrides)
  plan = listops.plan(cfg)
  assert set(plan) == set(cfg["families"])
  budget = cfg["budget_flops"] or cfg["steps"] * plan["softmax"][1]
  for family, (steps, per_step) in plan.items():
    m = listops.model_config(cfg, family)
    T = cfg["max_length"]
    assert per_step == flops.model_flops_per_token(m, T, causal=False)["train"] * cfg["batch_size"] * T
    assert abs(steps * per_step - budget) <= per_step / 2 + 1e-6 * budget  # within one step (rounded)
  if not overrides.get("smoke"):  # the cheaper families really do train longer
    assert plan["linear"][0] > plan["softmax"][0] and plan["local"][0] > plan["softmax"][0]


def test_task_losses_against_numpy():
  import numpy as np

  from efficient_attn._experiments._synthetic import step_seed

  cfg = experiment.resolve_config(mqar, {"smoke": True})
  batch = mqar._batch(cfg, step_seed(0, 0, 3), 4)
  assert (mqar._batch(cfg, step_seed(0, 0, 3), 4)["inputs"] == batch["inputs"]).all()  # pure function of step
  assert (mqar._batch(cfg, step_seed(0, 1), 4)["inputs"] != batch["inputs"]).any()  # eval stream differs
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(*batch["inputs"].shape, cfg["vocab_size"])).astype(np.float32)
  w = batch["weights"] > 0
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  loss, (correct, count) = mqar.task_loss(logits, batch)
  assert count == 4 * cfg["num_kv_pairs"] and loss == pytest.approx(nll[w].mean(), rel=1e-5)
  assert correct == (logits.argmax(-1) == batch["targets"])[w].sum()
  # Right at every query, wrong everywhere else: accuracy 1, so non-query positions are not scored.
  logits = np.where(np.arange(cfg["vocab_size"]) == batch["targets"][..., None], 9.0, 0.0) * w[..., None]
  _, (correct, count) = mqar.task_loss(logits.astype(np.float32), batch)
  assert correct == count

  labels = np.array([3, 1, 4, 1])
  logits = rng.normal(size=(4, 10)).astype(np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  loss, (correct, count) = listops.task_loss(logits, {"labels": labels})
  assert loss == pytest.approx(-logp[np.arange(4), labels].mean(), rel=1e-5) and count == 4
  assert correct == (logits.argmax(-1) == labels).sum()


def test_training_loop_learns_and_stops_on_divergence():
  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np

  from efficient_attn._experiments._synthetic import step_seed, train_and_eval

  w_true = np.arange(1.0, 5.0, dtype=np.float32)

  def batch(i):  # a linear regression: y = x·w_true, fresh x every step
    x = np.random.default_rng(step_seed(0, 0, i)).normal(size=(16, 4)).astype(np.float32)
    return {"inputs": x, "y": x @ w_true}

  model = nn.Dense(1)

  def loss_fn(params, b):
    err = model.apply(params, b["inputs"])[:, 0] - b["y"]  # params: the variables {"params": ...}
    return jnp.mean(err ** 2), (jnp.sum(jnp.abs(err) < 0.5), err.shape[0])

  kw = dict(steps=60, warmup_steps=1, seed=0, tokens_per_batch=16)
  out = train_and_eval(model, loss_fn, batch, [batch(10_000)], learning_rate=0.3, **kw)
  assert out["diverged_at_step"] is None and out["curve_step"][-1] == 60 and out["eval_curve_step"] == [60]
  assert out["eval_loss"] < 0.01 * out["curve_loss"][0] and out["accuracy"] == 1.0
  assert out["tokens_per_sec"] > 0 and out["memory_bytes"] >= 0
  # lr 1e30 (warmup makes the first update 0): the second update sends the weights to ~1e30, so the loss of
  # step 3 overflows and the loop stops there.
  out = train_and_eval(model, loss_fn, batch, [batch(10_000)], learning_rate=1e30, **kw)
  assert out["diverged_at_step"] == 3 and out["curve_step"][-1] == 3 and out["eval_curve_step"] == [3]


@pytest.mark.parametrize("name, overrides, match", [
    ("listops", {"families": ["softmax", "flash"]}, "use distinct names from"),
    ("listops", {"families": []}, "use distinct names from"),
    ("listops", {"families": ["sparse"], "max_length": 100}, "not divisible by block_size=16"),
    ("listops", {"attention_options.performer.num_features": 0}, "num_features=0 must be a positive integer"),
    ("listops", {"budget_flops": 1e6}, r"below one training step of family softmax \(.* FLOPs"),
    ("listops", {"min_length": 300}, "min_length=300 exceeds max_length=128"),
    ("listops", {"eval_examples": 100}, "not a multiple of batch_size"),
    ("listops", {"num_heads": 3}, "does not divide model.d_model=64"),
    ("mqar", {"families": ["mamba"]}, "use distinct names from"),
    ("mqar", {"widths": [32, 0]}, "positive integers"),
    ("mqar", {"steps": 0}, "steps=0 must be a positive integer"),
    ("mqar", {"seq_len": 20}, "too short for 8 key-value pairs"),
    ("mqar", {"families": ["sparse"], "seq_len": 72}, "not divisible by block_size=16"),
    ("mqar", {"mesh.context": 3}, "6 equal pieces, and T=64 is not a multiple of 6"),
    ("listops", {"mesh.context": 3}, "6 equal pieces, and T=128 is not a multiple of 6"),
])
def test_bad_settings(name, overrides, match):
  with pytest.raises(ConfigError, match=match) as e:
    experiment.resolve_config(experiment.load(name), overrides)
  assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")  # one sentence


def test_cli_refuses_bad_settings(tmp_path, capsys):
  d = str(tmp_path / "w")
  assert cli.main(["experiment", "listops", "--workdir", d, "--set", "nonsense=1"]) == 2
  assert "unknown key 'nonsense'" in capsys.readouterr().err
  assert cli.main(["experiment", "mqar", "--workdir", d, "--set", "widths=[7]", "--set", "num_heads=2"]) == 2
  assert "does not divide" in capsys.readouterr().err
  assert not os.path.exists(os.path.join(d, "results.jsonl"))


def test_mqar_sweeps_learning_rates_and_reports_the_best_per_cell():
  module = experiment.load("mqar")
  cfg = experiment.resolve_config(module, {"smoke": True, "learning_rates": [1e-3, 1e-2], "short_conv": 4,
                                           "families": ["gated_deltanet"], "widths": [16, 32]})
  names = module.variants(cfg)
  assert names == ["gated_deltanet-d16-lr0.001", "gated_deltanet-d16-lr0.01", "gated_deltanet-d32-lr0.001",
                   "gated_deltanet-d32-lr0.01"]
  assert [module._split(n) for n in names[:2]] == [("gated_deltanet", 16)] * 2 and module._rate(cfg, names[1]) == 1e-2
  assert module.model_config(cfg, "gated_deltanet", 16).conv_kernel == 4
  rows = [{"family": "gated_deltanet", "d_model": 16, "learning_rate": 1e-3, "accuracy": 0.4},
          {"family": "gated_deltanet", "d_model": 16, "learning_rate": 1e-2, "accuracy": 0.9, "diverged_at_step": 7},
          {"family": "gated_deltanet", "d_model": 32, "learning_rate": 1e-3, "accuracy": 0.5},
          {"family": "gated_deltanet", "d_model": 32, "learning_rate": 1e-2, "accuracy": 0.8}]
  best = {(r["d_model"]): r["learning_rate"] for r in module.best_rows(rows)}
  assert best == {16: 1e-3, 32: 1e-2}  # a diverged run never wins, whatever its last accuracy
