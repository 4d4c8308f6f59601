"""A user's own attention family: one file of theirs + `--plugin`, nothing edited in the package.

The plugin is the README's own example ("Your own attention family"), written to a file and
driven through the command line (`train` in a fresh interpreter, `bench` and `experiment` through
`cli.main` here): it trains, benches and enters the equal-compute comparison with its own FLOPs. In-process tests cover the record itself: defaults, typed options,
XLA-counted FLOPs, the Flax layer and refusals.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn import attention as A
from efficient_attn import flops
from efficient_attn.config import ConfigError, ModelConfig
from reference import one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
PLUGIN = re.search(r"```python\n(# my_attention\.py\n.*?)```", README, re.S).group(1)


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("plugin") / "my_attention.py"
  path.write_text(PLUGIN)
  return str(path)


def _cli(*args, cwd):
  return subprocess.run([sys.executable, "-m", "efficient_attn.cli", *args], cwd=cwd, env=one_device_env(),
                        capture_output=True, text=True, timeout=600)


def _forget_plugin(path):
  """Undoes what `--plugin path` did in this process: its family and its module."""
  for name in ("cosine",):
    A.FAMILIES.pop(name, None), A.ATTENTION.pop(name, None)
  for name in [m for m, mod in sys.modules.items() if getattr(mod, "__file__", None) == path]:
    del sys.modules[name]


@pytest.mark.slow
def test_plugin_trains_benches_and_enters_equal_compute(plugin_file, tmp_path, capsys):
  """`train --plugin` runs in a fresh interpreter (nothing but the flag registers the family there);
  `bench` and `experiment` take the same flag through `cli.main` in this process."""
  r = _cli("train", "--plugin", plugin_file, "--workdir", str(tmp_path / "train"), "--set", "model.attention=cosine",
           "--set", "model.attention_options.temperature=8.0", "--set", "train.steps=2", "--set", "train.log_every=1",
           "--set", "model.num_layers=1", "--set", "model.d_model=32", "--set", "model.ffn_dim=64",
           "--set", "train.seq_len=32", "--set", "mesh.data=1", "--set", "data.val_fraction=0.0", cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  rows = [json.loads(line) for line in open(tmp_path / "train" / "metrics.jsonl")]
  assert [row["step"] for row in rows] == [1, 2] and all(np.isfinite(row["loss"]) for row in rows)
  assert rows[0]["flops_per_token"] > 0  # counted by XLA: the plugin gives no FLOPs of its own

  from efficient_attn import cli

  assert "cosine" not in A.names()  # only --plugin registers it, here too
  try:
    assert cli.main(["bench", "attention", "--plugin", plugin_file, "--set", "variants=['jax_nn', 'cosine']",
                     "--set", "seq_lens=[128]", "--set", "repeats=1", "--json", str(tmp_path / "bench.json")]) == 0
    bench = {row["variant"]: row for row in json.load(open(tmp_path / "bench.json"))}
    assert set(bench) == {"jax_nn", "cosine"} and bench["cosine"]["time_s"] > 0

    assert cli.main(["experiment", "equal_compute", "--plugin", plugin_file, "--workdir", str(tmp_path / "eq"),
                     "--set", "smoke=true", "--set", "variants=['softmax', 'cosine']"]) == 0
  finally:
    _forget_plugin(plugin_file)
  capsys.readouterr()
  rows = {row["variant"]: row for row in map(json.loads, open(tmp_path / "eq" / "results.jsonl"))}
  assert set(rows) == {"softmax", "cosine"}
  # Equal compute with its own FLOPs: both spend the budget to within one step of their own cost.
  for row in rows.values():
    per_step = row["flops_per_token"] * row["batch_size"] * row["seq_len"]
    assert abs(row["flops"] - row["budget_flops"]) <= per_step / 2 + 1e-6 * row["budget_flops"]


def test_plugin_without_the_flag_is_refused(tmp_path, capsys):
  from efficient_attn import cli

  assert "cosine" not in A.names()
  assert cli.main(["train", "--workdir", str(tmp_path / "w"), "--set", "model.attention=cosine"]) == 2
  err = capsys.readouterr().err
  assert "--plugin" in err and "Traceback" not in err
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def _mine(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None):
  return A.softmax_attention(query, key, value, bias, mask, is_causal=is_causal, segment_ids=segment_ids,
                             scale=scale)


@dataclasses.dataclass(frozen=True)
class _Opts:
  sharpness: float = 1.0

  def __post_init__(self):
    if self.sharpness <= 0:
      raise ValueError(f"sharpness={self.sharpness} must be > 0.")


def _sharp(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None,
           sharpness=1.0):
  scale = (query.shape[-1] ** -0.5 if scale is None else scale) * sharpness
  return _mine(query, key, value, bias, mask, is_causal=is_causal, segment_ids=segment_ids, scale=scale)


def test_minimal_family_record_in_process():
  A.register(A.Family(name="mine_test", fn=_mine), replace=True)
  A.register(A.Family(name="sharp_test", fn=_sharp, options=_Opts), replace=True)
  try:
    assert {"mine_test", "sharp_test"} <= set(A.names()) and A.ATTENTION["mine_test"] is _mine
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 4, 8))
    np.testing.assert_allclose(A.attend("mine_test", q, q, q, is_causal=True),
                               A.softmax_attention(q, q, q, is_causal=True), atol=1e-6)
    # FLOPs default to XLA's count of the function: about the xla softmax's executed count.
    mine = flops.attention_flops("mine_test", 256, num_heads=4, head_dim=32)
    xla = flops.attention_flops("softmax", 256, num_heads=4, head_dim=32, implementation="xla")
    assert mine["ideal"] == mine["executed"] and 1.0 <= mine["executed"] / xla["executed"] <= 1.2
    # Typed options reach the layer and the model config; bad ones are refused before compiling.
    m = ModelConfig(attention="sharp_test", attention_options={"sharpness": 2.0}, num_layers=1, d_model=32,
                    num_heads=4, ffn_dim=64)
    assert m.options == _Opts(2.0)
    with pytest.raises(ConfigError, match="sharpness=-1.0 must be > 0"):
      ModelConfig(attention="sharp_test", attention_options={"sharpness": -1.0})
    with pytest.raises(ConfigError, match="no option 'sharp'"):
      ModelConfig(attention="sharp_test", attention_options={"sharp": 2.0})
    from efficient_attn.model import TransformerLM
    tokens = jnp.zeros((2, 16), jnp.int32)
    variables = TransformerLM(m).init(jax.random.PRNGKey(0), tokens)
    assert TransformerLM(m).apply(variables, tokens).shape == (2, 16, 256)
    with pytest.raises(ValueError, match="no decoding state"):
      A.init_decode_state("mine_test", 2, 4, 8, max_len=16)
  finally:
    for name in ("mine_test", "sharp_test"):
      A.FAMILIES.pop(name, None), A.ATTENTION.pop(name, None)


def test_register_refuses_bad_records():
  with pytest.raises(ValueError, match="already registered"):
    A.register(A.Family(name="softmax", fn=_mine))
  with pytest.raises(ValueError, match="identifier"):
    A.Family(name="my family", fn=_mine)
  with pytest.raises(ValueError, match="frozen dataclass"):
    A.Family(name="x", fn=_mine, options={"a": 1})
  with pytest.raises(ValueError, match="both `init_state` and `step`"):
    A.Family(name="x", fn=_mine, step=lambda *a: a)


def test_every_builtin_is_one_record():
  """The registry lists the five built-ins, each a record from its own file with typed options and FLOPs."""
  assert A.names()[:5] == ["softmax", "local", "sparse", "linear", "performer"]
  for name in A.names()[:5]:
    family = A.get(name)
    assert family.fn.__module__ == f"efficient_attn.attention.{name}"
    assert dataclasses.is_dataclass(family.options) and family.flops is not None
  assert [n for n in A.names()[:5] if A.get(n).decodes] == ["softmax", "local", "linear", "performer"]
  assert [n for n in A.names()[:5] if A.get(n).buffers] == ["performer"]
