"""Bad-input catalogue: every user mistake is refused the same way.

Each case runs the real command line in-process and checks the bar: exit status 2,
exactly one line on stderr naming the key and the value, no traceback, nothing
created in the workdir, and nothing compiled (building the train state would fail
the test).
"""

import os

import pytest

from efficient_attn import cli
from efficient_attn import train as train_module

NAN_CONFIG = """from efficient_attn.config import Config, TrainConfig
def get_config():
  return Config(train=TrainConfig(learning_rate=float("nan")))
"""


def files(tmp_path) -> dict[str, str]:
  """Small data files and config files the cases point at."""
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1") * 50)
  (tmp_path / "short.txt").write_text("hello world\n")
  (tmp_path / "nan_config.py").write_text(NAN_CONFIG)
  (tmp_path / "no_get_config.py").write_text("x = 1\n")
  (tmp_path / "a_file").write_text("not a directory\n")
  (tmp_path / "experiment").mkdir()  # an experiment's workdir: its config.json is not a training config
  (tmp_path / "experiment" / "config.json").write_text('{"variants": ["softmax"], "steps": 3}\n')
  return {name.split(".")[0]: str(tmp_path / name) for name in ("empty.txt", "latin1.txt", "short.txt",
                                                                  "nan_config.py", "no_get_config.py", "a_file",
                                                                  "experiment")}


# (id, argv after "train --workdir DIR" unless it starts with a command, fragments stderr must contain)
CASES = [
    ("unknown key", ["--set", "model.atention=linear"], ["'model.atention'", "valid keys"]),
    ("unparsable value", ["--set", "train.steps=many"], ["train.steps='many'", "expected int"]),
    ("bool for an int", ["--set", "train.steps=true"], ["train.steps=True", "expected int"]),
    ("NaN from --set", ["--set", "train.learning_rate=nan"], ["train.learning_rate='nan'", "expected float"]),
    ("NaN in a config file", ["--config", "{nan_config}"], ["train.learning_rate=nan", "finite"]),
    ("negative learning rate", ["--set", "train.learning_rate=-1"], ["train.learning_rate=-1", "> 0"]),
    ("negative steps", ["--set", "train.steps=-5"], ["train.steps=-5", "positive integer"]),
    ("unknown attention", ["--set", "model.attention=flash"], ["model.attention='flash'", "softmax"]),
    ("unknown nonfinite policy", ["--set", "train.on_nonfinite=explode"], ["train.on_nonfinite='explode'", "skip"]),
    ("heads not dividing d_model", ["--set", "model.num_heads=3"], ["model.num_heads=3", "model.d_model=256"]),
    ("experts vs mesh.expert", ["--set", "model.num_experts=6", "--set", "mesh.expert=4", "--set", "mesh.data=2"],
     ["model.num_experts=6", "mesh.expert=4"]),
    ("top_k > num_experts", ["--set", "model.num_experts=2", "--set", "model.top_k=3"],
     ["model.top_k=3", "model.num_experts=2"]),
    ("expert axis on a dense model", ["--set", "mesh.expert=2", "--set", "mesh.data=4"], ["mesh.expert=2"]),
    ("mesh product != devices", ["--set", "mesh.data=2"],
     ["mesh.data=2 x mesh.fsdp=1 x mesh.tensor=1 x mesh.expert=1 = 2 devices, but 8 are available"]),
    ("mesh axis not dividing devices", ["--set", "mesh.fsdp=3"],
     ["mesh.data=-1 with mesh.fsdp=3 x mesh.tensor=1 x mesh.expert=1 = 3", "8 available devices"]),
    ("batch vs data-parallel size", ["--set", "train.batch_size=4"], ["train.batch_size=4", "= 8"]),
    ("seq_len vs sparse block", ["--set", "model.attention=sparse", "--set", "train.seq_len=100"],
     ["train.seq_len=100", "block_size=64"]),
    ("misspelt family option", ["--set", "model.attention=local", "--set", "model.attention_options.windw=8"],
     ["'windw'", "window, block_size"]),
    ("unknown attention family", ["--set", "model.attention=mine"], ["model.attention='mine'", "--plugin"]),
    ("missing plugin file", ["--plugin", "/no/such/plugin.py"], ["--plugin /no/such/plugin.py", "no such file"]),
    ("val_fraction out of range", ["--set", "data.val_fraction=1.5"], ["data.val_fraction=1.5", "[0, 1)"]),
    ("missing config file", ["--config", "/no/such/config.py"], ["--config /no/such/config.py", "no such file"]),
    ("config file without get_config", ["--config", "{no_get_config}"], ["no_get_config.py", "get_config"]),
    ("text data without files", ["--set", "data.name=text"], ["data.name='text'", "data.files"]),
    ("missing data files", ["--set", "data.name=text", "--set", "data.files=/no/such/*.txt"],
     ["data.files='/no/such/*.txt'", "matches no file"]),
    ("empty data file", ["--set", "data.name=text", "--set", "data.files={empty}"],
     ["empty.txt", "no non-empty document"]),
    ("non-UTF-8 text", ["--set", "data.name=text", "--set", "data.files={latin1}"],
     ["latin1.txt", "not UTF-8"]),
    ("corpus smaller than a batch", ["--set", "data.name=text", "--set", "data.files={short}"],
     ["train.batch_size", "train.seq_len", "fewer than one batch"]),
    ("workdir is a file", ["--workdir", "{a_file}"], ["--workdir", "a_file", "not a directory"]),
    ("an experiment's workdir", ["--workdir", "{experiment}", "--set", "train.steps=5"],
     ["experiment/config.json", "not a training config"]),
    ("malformed --set", ["--set", "nonsense"], ["KEY=VALUE", "'nonsense'"]),
    ("unknown experiment", ["experiment", "nope", "--workdir", "{workdir}"], ["experiment 'nope'", "quickstart"]),
    ("unknown bench", ["bench", "flops"], ["invalid choice: 'flops'", "attention"]),
    ("train without --workdir", ["train"], ["--workdir"]),
]


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_sentence(tmp_path, capsys, monkeypatch, argv, fragments):
  paths = {**files(tmp_path), "workdir": str(tmp_path / "run")}
  argv = [a.format(**paths) for a in argv]
  if argv[0] not in ("experiment", "bench", "train"):
    argv = ["train", "--workdir", paths["workdir"], *argv]

  def compiled(*a, **k):
    raise AssertionError("bad input reached the train state (compilation) before being refused")

  monkeypatch.setattr(train_module, "init_state", compiled)
  before = sorted(os.listdir(tmp_path))
  try:
    rc = cli.main(argv)
  except SystemExit as e:  # argparse usage errors
    rc = e.code
  err = capsys.readouterr().err
  assert rc == 2, err
  assert err.count("\n") == 1 and err.startswith("efficient-attn"), err
  assert "Traceback" not in err
  for fragment in fragments:
    assert fragment.format(**paths) in err, (fragment, err)
  assert sorted(os.listdir(tmp_path)) == before  # no workdir, no checkpoints, no lock
