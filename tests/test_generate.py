"""`efficient-attn generate` / `eval` on a tiny trained workdir, and the sampler against references."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from efficient_attn import cli
from efficient_attn import generate as gen
from efficient_attn.config import (CONFIG_JSON, Config, DataConfig, MeshConfig, ModelConfig, TrainConfig,
                                   save_config_json)
from efficient_attn.model import TransformerLM

PROMPT = "import os\ndef "


def _tiny(attention="softmax", options=None, seq_len=64):
  model = ModelConfig(attention=attention, attention_options=options, num_layers=2, d_model=32, num_heads=2,
                      ffn_dim=64)
  tr = TrainConfig(steps=8, batch_size=4, seq_len=seq_len, warmup_steps=2, log_every=4, checkpoint_every=4,
                   eval_batches=1)
  return Config(model=model, train=tr, data=DataConfig(), mesh=MeshConfig(data=1))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  from efficient_attn.train import train

  d = str(tmp_path_factory.mktemp("gen") / "run")
  cfg = _tiny()  # trained on a 2-device fsdp mesh (params sharded); every test here reads it onto one device
  cfg = Config(model=cfg.model, train=cfg.train, data=cfg.data, mesh=MeshConfig(data=1, fsdp=2))
  train(cfg, d, devices=jax.devices()[:2], progress=False)
  if not os.path.exists(os.path.join(d, CONFIG_JSON)):  # until `train` writes it itself
    save_config_json(cfg, os.path.join(d, CONFIG_JSON))
  return d


def _saved_params(workdir, step=8):
  """The checkpoint's params read with orbax directly (not through efficient_attn.generate)."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
    assert mngr.latest_step() == step
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]


def _argmax_decode(model, variables, prompt, n, length):
  """Reference greedy decoding: the causal parallel forward over the prefix (zero-padded to `length`, which
  causality makes harmless and which compiles once), argmax at the prefix's last position."""
  forward = jax.jit(model.apply)
  tokens = list(prompt)
  for _ in range(n):
    buf = np.zeros((1, length), np.int32)
    buf[0, :len(tokens)] = tokens
    tokens.append(int(jnp.argmax(forward(variables, buf)[0, len(tokens) - 1])))
  return tokens[len(prompt):]


def test_generate_greedy_is_the_parallel_forwards_argmax(workdir, capsys):
  argv = ["generate", "--workdir", workdir, "--prompt", PROMPT, "--set", "sample.temperature=0",
          "--set", "sample.max_new_tokens=12"]
  assert cli.main(argv) == 0
  out, err = capsys.readouterr()
  assert out.startswith(PROMPT) and "from step 8" in err
  text = out[:-1]  # print's newline
  cfg = gen.load_workdir_config(workdir)
  ref = _argmax_decode(TransformerLM(cfg.model), {"params": _saved_params(workdir)}, PROMPT.encode(), 12, 64)
  assert text == gen.decode(list(PROMPT.encode()) + ref)
  assert cli.main(argv) == 0 and capsys.readouterr().out[:-1] == text  # deterministic


def test_sampling_is_seeded(workdir):
  kw = {"sample.max_new_tokens": 24, "sample.temperature": 1.0, "sample.top_k": 50, "sample.top_p": 0.95}
  a = gen.generate(workdir, PROMPT, {**kw, "sample.seed": 1})
  b = gen.generate(workdir, PROMPT, {**kw, "sample.seed": 1})
  c = gen.generate(workdir, PROMPT, {**kw, "sample.seed": 2})
  assert a["tokens"] == b["tokens"] and a["tokens"] != c["tokens"] and len(a["tokens"]) == 24
  # max_new_tokens=0: 200, or as many as fit after the prompt in train.seq_len=64.
  assert len(gen.generate(workdir, PROMPT, {"sample.seed": 3})["tokens"]) == 64 - len(PROMPT.encode())


def test_eval_json_against_a_numpy_reference(workdir, capsys):
  from efficient_attn.data.text import PackedStream, lm_example, load_documents, split_documents

  assert cli.main(["eval", "--workdir", workdir, "--set", "eval.batches=2"]) == 0
  row = json.loads(capsys.readouterr().out)
  assert row["step"] == 8 and row["batches"] == 2 and row["split"] == "validation"
  assert row["bits_per_byte"] == pytest.approx(row["val_loss"] / math.log(2), rel=1e-12)
  assert row["perplexity"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-12)
  # Reference: the same held-out batches `train` validates on, scored in numpy.
  cfg = gen.load_workdir_config(workdir)
  _, val = split_documents(load_documents(), cfg.data.val_fraction)
  stream = PackedStream(val, cfg.train.seq_len, cfg.train.batch_size, cfg.train.seed + 1)
  forward, params = jax.jit(TransformerLM(cfg.model).apply), _saved_params(workdir)
  nll, weight = 0.0, 0.0
  for i in range(2):
    b = lm_example(stream.batch(i))
    logits = np.asarray(forward({"params": params}, b["inputs"], segment_ids=b["segment_ids"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll -= (np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0] * b["weights"]).sum()
    weight += b["weights"].sum()
  assert row["tokens"] == weight
  assert row["val_loss"] == pytest.approx(nll / weight, rel=1e-5)
  # One batch is what train validated on (train.eval_batches=1): the same number.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [r for r in map(json.loads, f) if "val_loss" in r][-1]
  assert gen.evaluate(workdir, {"eval.batches": 1})["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5)


def test_eval_restores_an_fsdp_checkpoint_onto_one_device(workdir):
  """The checkpoint saved from the 2-device fsdp mesh (params sharded) is read onto one device: the validation
  loss equals the one `train` logged on the mesh."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [r for r in map(json.loads, f) if "val_loss" in r][-1]
  assert gen.evaluate(workdir, {"eval.batches": 1})["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5)


@pytest.mark.parametrize("case, fragment", [
    ("missing", "is not a directory"),
    ("empty", "has no config.json"),
    ("no_checkpoint", "holds no checkpoint"),
    ("experiment", "is not a training config"),
    (["--prompt", "x" * 64], "--prompt is 64 bytes"),
    (["--set", "sample.max_new_tokens=60"], "set sample.max_new_tokens to at most 50"),
    (["--prompt", ""], "--prompt is empty"),
    (["--set", "sample.temperature=-0.5"], "sample.temperature=-0.5 must be a finite number >= 0"),
    (["--set", "sample.top_p=1.5"], "sample.top_p=1.5 must be in (0, 1]"),
    (["--set", "sample.top_k=-1"], "sample.top_k=-1 must be >= 0"),
    (["--set", "sample.top_k=2.5"], "sample.top_k=2.5 has type float"),
    (["--set", "sample.temprature=0"], "unknown key 'sample.temprature' for generate; did you mean"
                                       " 'sample.temperature'?"),
    (["--set", "model.d_model=8"], "unknown key 'model.d_model' for generate"),
    (["eval", "--set", "eval.batches=-1"], "eval.batches=-1 must be >= 0"),
    (["eval", "--set", "eval.batchs=1"], "did you mean 'eval.batches'?"),
])
def test_bad_input_exits_2_before_restoring(workdir, tmp_path, monkeypatch, capsys, case, fragment):
  def unreachable(*a, **k):
    raise AssertionError("a user error must be refused before the checkpoint is restored")

  monkeypatch.setattr(gen, "restore_variables", unreachable)
  d, extra, command = workdir, [], "generate"
  if isinstance(case, list):
    command, extra = ("eval", case[1:]) if case[0] == "eval" else ("generate", case)
  elif case == "missing":
    d = str(tmp_path / "nowhere")
  elif case in ("empty", "no_checkpoint", "experiment"):
    d = str(tmp_path)
    if case == "no_checkpoint":
      save_config_json(gen.load_workdir_config(workdir), str(tmp_path / CONFIG_JSON))
    if case == "experiment":
      (tmp_path / CONFIG_JSON).write_text(json.dumps({"variants": ["softmax"], "steps": 3}))
  argv = [command, "--workdir", d] + (["--prompt", PROMPT] if command == "generate" and "--prompt" not in extra
                                      else []) + extra
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_filter_logits_against_numpy():
  logits = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (6, 40)) * 2.0)

  def reference(row, k, p):
    order = np.argsort(-row)
    keep = np.zeros(row.shape, bool)
    keep[order[:k or len(row)]] = True
    z = np.where(keep, row, -np.inf)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    mass = 0.0
    nucleus = np.zeros(row.shape, bool)
    for j in np.argsort(-z):  # most likely first, until the mass before a token reaches p
      if mass >= p:
        break
      nucleus[j] = True
      mass += probs[j]
    return keep & nucleus

  for k, p in [(0, 1.0), (5, 1.0), (0, 0.5), (7, 0.8), (1, 0.9), (0, 1e-6), (40, 0.999)]:
    out = np.asarray(gen.filter_logits(jnp.asarray(logits), k, p))
    for row, got in zip(logits, out):
      kept = np.isfinite(got)
      np.testing.assert_array_equal(kept, reference(row, k, p), err_msg=f"top_k={k} top_p={p}")
      np.testing.assert_array_equal(got[kept], row[kept])


def test_choose_draws_from_the_filtered_tempered_softmax():
  logits = jnp.asarray([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
  temperature, k, p = 0.7, 5, 0.9
  keys = jax.random.split(jax.random.PRNGKey(0), 20000)
  draws = np.asarray(jax.vmap(lambda key: gen.choose(logits, key, temperature, k, p))(keys))
  z = np.asarray(logits) / temperature
  probs = np.exp(z - z.max())
  probs[k:] = 0.0
  probs /= probs.sum()
  before = np.cumsum(probs) - probs
  probs[before >= p] = 0.0  # (sorted already) outside the nucleus
  probs /= probs.sum()
  freq = np.bincount(draws, minlength=8) / len(draws)
  assert np.all(freq[probs == 0] == 0)
  np.testing.assert_allclose(freq, probs, atol=0.015)
  assert int(gen.choose(logits, keys[0], 0.0, k, p)) == 0  # temperature 0: the argmax


@pytest.mark.parametrize("attention, options", [("linear", {"chunk_size": 16}), ("sparse", {"block_size": 16})])
def test_sample_greedy_matches_the_parallel_forward(attention, options):
  """Decoding (linear: recurrent state) and the recompute path of a family that cannot decode (sparse)."""
  cfg = _tiny(attention, options, seq_len=32).model
  model = TransformerLM(cfg)
  L, prompt = 32, np.frombuffer(b"def f(x):", np.uint8).astype(np.int32)
  variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, L), jnp.int32)))
  new = gen.sample(model, variables, prompt, max_new_tokens=10, temperature=0.0, max_len=L)
  assert new.tolist() == _argmax_decode(model, variables, prompt, 10, L)
