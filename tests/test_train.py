"""Training end to end on the default corpus: learning, exact resume, meshes, multi-process, CLI errors."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from efficient_attn import cli
from efficient_attn.config import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig
from efficient_attn.train import NonFiniteError, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


OPTIONS = {"local": {"window": 16}, "sparse": {"block_size": 16}, "linear": {"chunk_size": 16},
           "performer": {"num_features": 32, "chunk_size": 16}}


def tiny(attention="softmax", steps=30, mesh=MeshConfig(data=1), **model_kw):
  model = ModelConfig(attention=attention, attention_options=OPTIONS.get(attention), num_layers=2, d_model=64,
                      num_heads=4, ffn_dim=128, **model_kw)
  tr = TrainConfig(steps=steps, batch_size=8, seq_len=64, learning_rate=3e-3, warmup_steps=5, log_every=5,
                   checkpoint_every=10, eval_batches=1)
  return Config(model=model, train=tr, data=DataConfig(), mesh=mesh)


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("attention, moe", [("softmax", {}), ("local", {}), ("sparse", {}), ("linear", {}),
                                            ("performer", {}), ("softmax", {"num_experts": 4, "top_k": 2}),
                                            ("linear", {"dtype": "bfloat16"})])
def test_tiny_lm_learns(tmp_path, attention, moe):
  train(tiny(attention, **moe), str(tmp_path), devices=jax.devices()[:1])
  rows = losses(tmp_path)
  assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, rows
  for key in ("tokens_per_sec", "mfu", "learning_rate", "grad_norm"):
    assert rows[-1][key] > 0
  if "num_experts" in moe:
    assert len(rows[-1]["expert_fraction"]) == 4 and 0 <= rows[-1]["dropped_fraction"] <= 1
  assert os.path.isdir(tmp_path / "checkpoints" / "30")


def test_interrupted_run_logs_the_same_losses(tmp_path):
  cfg = tiny(steps=20)
  train(cfg, str(tmp_path / "full"), devices=jax.devices()[:1])
  train(cfg, str(tmp_path / "cut"), devices=jax.devices()[:1], stop_after=13)  # checkpoints at 10 and 13
  train(cfg, str(tmp_path / "cut"), devices=jax.devices()[:1])
  full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
  assert [r["step"] for r in cut] == [r["step"] for r in full]
  np.testing.assert_allclose([r["loss"] for r in cut], [r["loss"] for r in full], atol=1e-5)


def test_performer_buffers_are_checkpointed_and_redrawn(tmp_path):
  """The Performer's per-layer projections live in the train state: saved, restored (an interrupted run
  logs the losses of an uninterrupted one, redraws included) and redrawn every train.redraw_every steps."""
  import orbax.checkpoint as ocp

  cfg = tiny("performer", steps=12)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, redraw_every=4, log_every=2,
                                                           checkpoint_every=6))
  train(cfg, str(tmp_path / "full"), devices=jax.devices()[:1])
  train(cfg, str(tmp_path / "cut"), devices=jax.devices()[:1], stop_after=7)
  train(cfg, str(tmp_path / "cut"), devices=jax.devices()[:1])
  full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
  np.testing.assert_allclose([r["loss"] for r in cut], [r["loss"] for r in full], atol=1e-5)
  saved = {}
  for step in (6, 12):
    with ocp.CheckpointManager(str(tmp_path / "full" / "checkpoints")) as mngr:
      restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    saved[step] = np.asarray(jax.tree.leaves(restored["buffers"])[0])
  assert saved[6].shape == (32, 16)
  assert not np.allclose(saved[6], saved[12])  # redrawn at steps 8 (and 4)
  # Without redraw_every the projection stays what init drew (from PRNGKey(train.seed)).
  from efficient_attn.model import TransformerLM

  still = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, redraw_every=0, steps=2, checkpoint_every=2))
  train(still, str(tmp_path / "still"), devices=jax.devices()[:1])
  with ocp.CheckpointManager(str(tmp_path / "still" / "checkpoints")) as mngr:
    kept = mngr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  dummy = jax.numpy.zeros((cfg.train.batch_size, cfg.train.seq_len), jax.numpy.int32)
  drawn = jax.jit(lambda: TransformerLM(cfg.model).init(jax.random.PRNGKey(cfg.train.seed), dummy)["buffers"])()
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(kept["buffers"])[0]), np.asarray(jax.tree.leaves(drawn)[0]))
  assert not np.allclose(saved[6], np.asarray(jax.tree.leaves(drawn)[0]))  # the redraw at step 4 replaced it


@pytest.mark.parametrize("mesh, moe", [(MeshConfig(data=2, fsdp=2, tensor=2), {}),
                                       (MeshConfig(data=2, expert=4), {"num_experts": 4})])
def test_sharded_run_matches_one_device(tmp_path, mesh, moe):
  train(tiny(steps=10, **moe), str(tmp_path / "one"), devices=jax.devices()[:1])
  train(tiny(steps=10, mesh=mesh, **moe), str(tmp_path / "mesh"))
  np.testing.assert_allclose([r["loss"] for r in losses(tmp_path / "mesh")],
                             [r["loss"] for r in losses(tmp_path / "one")], rtol=2e-4)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  train(tiny(steps=20), str(tmp_path / "ref"), devices=jax.devices()[:1])
  train(tiny(steps=20, mesh=MeshConfig(data=2, fsdp=2, tensor=2)), str(tmp_path / "run"), stop_after=10)
  train(tiny(steps=20, mesh=MeshConfig(data=1)), str(tmp_path / "run"), devices=jax.devices()[:1])
  np.testing.assert_allclose([r["loss"] for r in losses(tmp_path / "run")],
                             [r["loss"] for r in losses(tmp_path / "ref")], rtol=2e-4)


def test_non_finite_loss_stops_without_saving(tmp_path):
  cfg = tiny(steps=30)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rate=1e12, grad_clip=0.0,
                                                           warmup_steps=0))
  with pytest.raises(NonFiniteError, match="non-finite loss or gradient at step"):
    train(cfg, str(tmp_path), devices=jax.devices()[:1])
  ckpts = os.listdir(tmp_path / "checkpoints") if os.path.isdir(tmp_path / "checkpoints") else []
  assert "30" not in ckpts


def test_cli_train_and_config_errors(tmp_path, capsys):
  rc = cli.main(["train", "--workdir", str(tmp_path), "--set", "model.num_heads=3"])
  err = capsys.readouterr().err
  assert rc == 2 and "model.num_heads=3" in err and "Traceback" not in err
  rc = cli.main(["train", "--workdir", str(tmp_path), "--config", str(tmp_path / "nope.py")])
  assert rc == 2 and "no such file" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "checkpoints")


def test_two_process_launch(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  env["EFFICIENT_ATTN"] = f"{sys.executable} -m efficient_attn.cli"
  cmd = ["bash", os.path.join(REPO, "scripts", "launch_local.sh"), "train", "--workdir", str(tmp_path),
         "--set", "train.steps=4", "--set", "train.log_every=2", "--set", "train.seq_len=64",
         "--set", "model.num_layers=1", "--set", "model.d_model=64", "--set", "mesh.data=4",
         "--set", "mesh.fsdp=2"]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  rows = losses(tmp_path)
  assert [row["step"] for row in rows] == [2, 4] and all(np.isfinite(row["loss"]) for row in rows)
