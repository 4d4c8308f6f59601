"""Training end to end on the default corpus: learning, resume, reruns, grad accumulation, schedules, CLI errors.

Resume after faults, other meshes and two processes: tests/test_faults.py; sharded = one device:
tests/test_sharding.py."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from efficient_attn import cli
from efficient_attn.config import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig
from efficient_attn.train import train
from reference import one_device_env



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


# Whole-trainer runs: dense, the Performer's buffers, MoE's metrics, bfloat16. Every family's attention layer
# learning is tests/test_gated_delta.py::test_every_family_layer_trains.
@pytest.mark.parametrize("attention, moe", [("softmax", {}), ("performer", {}),
                                            ("softmax", {"num_experts": 4, "top_k": 2}),
                                            ("linear", {"dtype": "bfloat16"})])
def test_tiny_lm_learns(tmp_path, attention, moe):
  train(tiny(attention, **moe), str(tmp_path), devices=jax.devices()[:1])
  rows = losses(tmp_path)
  assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, rows
  for key in ("tokens_per_sec", "learning_rate", "grad_norm"):
    assert rows[-1][key] > 0
  for r in rows:  # MFU is a fraction of the peak, or null with the reason (a shared machine, a low peak)
    assert (r["mfu"] is not None and 0 < r["mfu"] <= 1) or (r["mfu"] is None and r["mfu_note"]), r
  if "num_experts" in moe:
    assert len(rows[-1]["expert_fraction"]) == 4 and 0 <= rows[-1]["dropped_fraction"] <= 1
  assert os.path.isdir(tmp_path / "checkpoints" / "30")


@pytest.mark.slow
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

  still = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, redraw_every=0))  # the same train step
  train(still, str(tmp_path / "still"), devices=jax.devices()[:1], stop_after=2)  # saves step 2
  with ocp.CheckpointManager(str(tmp_path / "still" / "checkpoints")) as mngr:
    kept = mngr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  dummy = jax.numpy.zeros((cfg.train.batch_size, cfg.train.seq_len), jax.numpy.int32)
  drawn = jax.jit(lambda: TransformerLM(cfg.model).init(jax.random.PRNGKey(cfg.train.seed), dummy)["buffers"])()
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(kept["buffers"])[0]), np.asarray(jax.tree.leaves(drawn)[0]))
  assert not np.allclose(saved[6], np.asarray(jax.tree.leaves(drawn)[0]))  # the redraw at step 4 replaced it


def test_cli_train_and_config_errors(tmp_path, capsys):
  rc = cli.main(["train", "--workdir", str(tmp_path), "--set", "model.num_heads=3"])
  err = capsys.readouterr().err
  assert rc == 2 and "model.num_heads=3" in err and "Traceback" not in err
  rc = cli.main(["train", "--workdir", str(tmp_path), "--config", str(tmp_path / "nope.py")])
  assert rc == 2 and "no such file" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "checkpoints")


# ----------------------------------------------------------------------------- issue 14: logs, safe resume, options


TINY_SETS = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.ffn_dim=128", "train.steps=10",
             "train.batch_size=8", "train.seq_len=64", "train.learning_rate=3e-3", "train.warmup_steps=5",
             "train.log_every=5", "train.checkpoint_every=10", "train.eval_batches=1"]  # = tiny(steps=10)


def test_rerun_with_another_attention_is_refused_before_compiling(tmp_path, capsys, monkeypatch):
  from efficient_attn import train as train_module

  train(tiny(steps=10), str(tmp_path), devices=jax.devices()[:1], stop_after=5)
  before = (tmp_path / "metrics.jsonl").read_text()
  capsys.readouterr()

  def compiled(*a, **k):
    raise AssertionError("the rerun reached the train state before being refused")

  monkeypatch.setattr(train_module, "init_state", compiled)
  sets = [a for kv in TINY_SETS + ["mesh.data=-1", "model.attention=linear"] for a in ("--set", kv)]
  assert cli.main(["train", "--workdir", str(tmp_path), *sets]) == 2  # a new mesh may resume; a new family not
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert "model.attention='softmax' there, 'linear' now" in err and "another --workdir" in err, err
  assert "mesh.data" not in err.split("(a resume may change only")[0]  # only the differing key is named
  assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing mixed in
  assert json.loads((tmp_path / "config.json").read_text())["model.attention"] == "softmax"


def test_more_steps_resume_and_the_logs_say_so(tmp_path, capsys):
  """Rerun with train.steps raised: resumes (logged as such), plain lines on a non-terminal stderr, a summary."""
  train(tiny(steps=10), str(tmp_path), devices=jax.devices()[:1])
  err = capsys.readouterr().err
  assert "step 5/10  loss " in err and " tokens/s " in err and " eta " in err
  assert "done: step 10/10, train loss " in err and "bits/byte" in err and "wall " in err
  assert "resumed" not in err
  summary = train(tiny(steps=20), str(tmp_path), devices=jax.devices()[:1])
  err = capsys.readouterr().err
  assert f"resumed from step 10 (checkpoint {tmp_path / 'checkpoints' / '10'})" in err
  assert "step 15/20" in err and "done: step 20/20" in err
  assert summary["step"] == 20 and summary["val_loss"] > 0 and summary["tokens_per_sec"] > 0
  assert [r["step"] for r in losses(tmp_path)] == [5, 10, 15, 20]
  assert json.loads((tmp_path / "config.json").read_text())["train.steps"] == 20


def test_a_workdir_without_config_json_resumes_and_gets_one(tmp_path, capsys):
  train(tiny(steps=10), str(tmp_path), devices=jax.devices()[:1], stop_after=5)
  os.remove(tmp_path / "config.json")  # as written before workdirs kept their config
  capsys.readouterr()
  train(tiny(steps=10), str(tmp_path), devices=jax.devices()[:1])
  err = capsys.readouterr().err
  assert "has checkpoints but no config.json" in err and "resumed from step 5" in err
  assert json.loads((tmp_path / "config.json").read_text())["train.steps"] == 10


def test_a_rerun_starts_from_config_json_and_changes_only_the_keys_set(tmp_path, capsys, monkeypatch):
  """A run made with several --set keys, rerun with only train.steps: it continues (one line says so) with
  every other stored key kept; a changed model key is still refused in one sentence, nothing saved lost."""
  from efficient_attn import train as train_module

  wd = str(tmp_path)
  made = ["model.attention=linear", "model.attention_options.chunk_size=16", "model.num_layers=1", "model.d_model=32",
          "model.ffn_dim=64", "train.seq_len=32", "train.steps=1", "train.warmup_steps=0", "train.learning_rate=1e-3",
          "train.eval_batches=1"]
  assert cli.main(["train", "--workdir", wd, *[a for kv in made for a in ("--set", kv)]]) == 0
  stored = json.loads((tmp_path / "config.json").read_text())
  assert "continuing" not in capsys.readouterr().err

  assert cli.main(["train", "--workdir", wd, "--set", "train.steps=2"]) == 0
  err = capsys.readouterr().err
  assert f"efficient-attn: continuing the run in {wd} from its config.json (changed: train.steps 1 -> 2)\n" in err
  assert "resumed from step 1" in err and "done: step 2/2" in err, err
  assert json.loads((tmp_path / "config.json").read_text()) == {**stored, "train.steps": 2}
  assert [r["step"] for r in losses(tmp_path)] == [1, 2]

  before = {name: (tmp_path / name).read_text() for name in ("metrics.jsonl", "config.json")}
  checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))

  def compiled(*a, **k):
    raise AssertionError("the rerun reached the train state before being refused")

  monkeypatch.setattr(train_module, "init_state", compiled)
  assert cli.main(["train", "--workdir", wd, "--set", "train.steps=3", "--set", "model.d_model=64"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err and "continuing" not in err, err
  assert "model.d_model=32 there, 64 now" in err and "another --workdir" in err, err
  assert {name: (tmp_path / name).read_text() for name in before} == before
  assert sorted(os.listdir(tmp_path / "checkpoints")) == checkpoints


def _grad_keeper():
  """An optimizer that leaves the params alone and keeps the step's gradient in its state: what the
  train step hands to the optimizer, read before Adam (which divides each entry by its own magnitude,
  so a gradient entry that is ~0 moves its param by up to the learning rate on rounding alone)."""
  import optax

  return optax.GradientTransformation(lambda params: {"grads": jax.tree.map(jax.numpy.zeros_like, params)},
                                      lambda g, state, params=None: (jax.tree.map(jax.numpy.zeros_like, g),
                                                                     {"grads": g}))


def _one_step(extra, devices):
  """(gradients, metrics) of one train step on a fixed global batch of 8 rows."""
  from efficient_attn import sharding
  from efficient_attn.config import parse_overrides, validate, with_overrides
  from efficient_attn.data.text import PackedStream, lm_example
  from efficient_attn.model import TransformerLM
  from efficient_attn.state import init_state
  from efficient_attn.train import make_optimizer, make_train_step

  cfg = with_overrides(Config(), parse_overrides(
      ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.ffn_dim=64", "train.seq_len=32",
       "train.batch_size=8", "train.warmup_steps=0", *extra]))
  mesh = sharding.make_mesh(validate(cfg, len(devices)), devices)
  model, (_, schedule), tx = TransformerLM(cfg.model), make_optimizer(cfg.train), _grad_keeper()
  stream = PackedStream([bytes(range(32, 127)) * 40, b"def f(x):\n  return x\n" * 30], 32, 8, 0)
  with jax.set_mesh(mesh):
    state, state_sh = init_state(model, tx, mesh, jax.numpy.zeros((8, 32), jax.numpy.int32), jax.random.PRNGKey(0))
    step = make_train_step(model, tx, schedule, cfg.train, state_sh,
                           {k: sharding.batch_sharding(mesh) for k in ("inputs", "targets", "segment_ids", "weights")})
    state, metrics = step(state, sharding.global_batch(lm_example(stream.batch(0)), mesh))
  return jax.device_get(state["opt_state"]["grads"]), jax.device_get(metrics)


@functools.cache
def _whole_batch_step():
  """_one_step without accumulation on one device: the reference every accumulation case shares."""
  return _one_step(["mesh.data=1"], jax.devices()[:1])


@pytest.mark.parametrize("accum, mesh", [(2, ["mesh.data=1"]), (4, ["mesh.data=1"]),
                                         (2, ["mesh.data=2", "mesh.fsdp=2"])])
def test_grad_accum_gives_the_whole_batch_update(accum, mesh):
  """The accumulated gradient is the whole batch's, up to summation order: each entry within 1e-4 of its
  tensor's largest entry (float32 reordering gives ~1e-6 here; a mis-weighted micro-batch gives ~1e-1)."""
  devices = jax.devices()[:1] if mesh == ["mesh.data=1"] else jax.devices()[:4]
  ref_grads, ref = _whole_batch_step()
  grads, got = _one_step([f"train.grad_accum={accum}", *mesh], devices)
  np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
  np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True):
    scale = float(np.max(np.abs(b)))
    assert scale > 0, path
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_schedules(schedule):
  from efficient_attn.train import make_schedule

  t = TrainConfig(steps=100, warmup_steps=10, learning_rate=1.0, schedule=schedule)
  lr = np.array([float(make_schedule(t)(s)) for s in range(101)])
  np.testing.assert_allclose(lr[:11], np.arange(11) / 10, atol=1e-6)  # linear warmup, every schedule
  final = {"cosine": 0.1, "linear": 0.1, "constant": 1.0, "wsd": 0.1}[schedule]
  assert lr[100] == pytest.approx(final, abs=1e-6)
  assert np.all(np.diff(lr[10:]) <= 1e-7)  # never rises after warmup
  if schedule == "wsd":  # stable to 80%, then linear to 10%
    np.testing.assert_allclose(lr[10:81], 1.0, atol=1e-6)
    np.testing.assert_allclose(lr[90], 0.55, atol=1e-6)
  if schedule == "linear":
    np.testing.assert_allclose(lr[55], 0.55, atol=1e-6)


def test_dropout_and_grad_accum_resume_exactly(tmp_path):
  """The dropout key is a function of (train.seed, step): an interrupted run logs the uninterrupted losses."""
  cfg = tiny(steps=10, dropout=0.1)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=2))
  train(cfg, str(tmp_path / "full"), devices=jax.devices()[:1])
  train(cfg, str(tmp_path / "cut"), devices=jax.devices()[:1], stop_after=7)
  train(cfg, str(tmp_path / "cut"), devices=jax.devices()[:1])
  np.testing.assert_allclose([r["loss"] for r in losses(tmp_path / "cut")],
                             [r["loss"] for r in losses(tmp_path / "full")], atol=1e-5)
  train(tiny(steps=10), str(tmp_path / "plain"), devices=jax.devices()[:1])
  assert losses(tmp_path / "plain")[0]["loss"] != pytest.approx(losses(tmp_path / "full")[0]["loss"], abs=1e-4)


def _event_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from the TensorBoard event files under `logdir` (TFRecord framing)."""
  import struct

  from tensorboardX.proto import event_pb2

  out: dict[str, list] = {}
  for name in sorted(os.listdir(logdir)):
    data = open(os.path.join(logdir, name), "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_tensorboard_scalars(tmp_path):
  pytest.importorskip("tensorboardX")
  cfg = tiny(steps=10)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tensorboard=True))
  train(cfg, str(tmp_path), devices=jax.devices()[:1])
  scalars = _event_scalars(tmp_path / "tensorboard")
  assert [s for s, _ in scalars["train/loss"]] == [5, 10]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in losses(tmp_path)], rtol=1e-6)
  assert [s for s, _ in scalars["val/loss"]] == [10] and "train/tokens_per_sec" in scalars


def test_tensorboard_without_the_package_is_one_sentence(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
  rc = cli.main(["train", "--workdir", str(tmp_path / "run"), "--set", "train.tensorboard=true"])
  err = capsys.readouterr().err
  assert rc == 2 and err.count("\n") == 1 and "needs the tensorboardX package: pip install tensorboardX" in err, err
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_readme_mesh_example_trains_on_one_cpu_with_plain_logs(tmp_path):
  """`train --set mesh.data=2 --set mesh.expert=4` on a CPU host without XLA_FLAGS emulates the 8 devices;
  stderr (a pipe) gets plain lines and a summary, and no SPMD rematerialization warning."""
  env = one_device_env()  # no device count: the CLI emulates the 8 the mesh names
  cmd = [sys.executable, "-m", "efficient_attn.cli", "train", "--workdir", str(tmp_path)] + [
      a for kv in ["mesh.data=2", "mesh.expert=4", "model.num_experts=4", "model.num_layers=1", "model.d_model=32",
                   "model.ffn_dim=64", "train.seq_len=32", "train.steps=2", "train.log_every=1",
                   "train.eval_batches=1"] for a in ("--set", kv)]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  assert "step 1/2  loss " in r.stderr and "done: step 2/2, train loss " in r.stderr, r.stderr
  assert "Involuntary full rematerialization" not in r.stderr and "[SPMD]" not in r.stderr, r.stderr
  assert [row["step"] for row in losses(tmp_path)] == [1, 2]
