"""Training config: overrides, validation before compilation, config files."""

import pytest

from efficient_attn.config import Config, ConfigError, flatten, load_config_file, validate, with_overrides

DESIGN_KEYS = ["model.attention", "model.num_layers", "model.d_model", "model.num_heads", "model.ffn_dim",
               "model.num_experts", "model.top_k", "train.steps", "train.batch_size", "train.seq_len",
               "train.learning_rate", "train.seed", "train.log_every", "train.checkpoint_every", "data.name",
               "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.expert"]


def test_every_design_key_exists():
  assert set(DESIGN_KEYS) <= set(flatten(Config()))


def test_overrides_apply():
  cfg = with_overrides(Config(), {"model.attention": "performer", "train.steps": 7, "train.learning_rate": 1})
  assert cfg.model.attention == "performer" and cfg.train.steps == 7 and cfg.train.learning_rate == 1
  assert validate(cfg, 8) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}


@pytest.mark.parametrize("overrides, fragment", [
    ({"model.attention": "flash"}, "model.attention='flash'"),
    ({"model.num_heads": 3}, "num_heads=3 does not divide model.d_model=256"),
    ({"model.num_experts": 6, "mesh.expert": 4, "mesh.data": 2}, "num_experts=6 is not divisible by mesh.expert=4"),
    ({"model.num_experts": 2, "model.top_k": 3}, "top_k=3 exceeds"),
    ({"mesh.fsdp": 3}, "does not divide the 8 available devices"),
    ({"mesh.data": 2, "mesh.fsdp": 2}, "4 devices, but 8 are available"),
    ({"train.batch_size": 4}, "batch_size=4 is not divisible by the data-parallel size"),
    ({"model.attention": "sparse", "train.seq_len": 100}, "seq_len=100 is not divisible by model.block_size=64"),
    ({"train.learning_rate": float("nan")}, "must be a finite number"),
    ({"train.learning_rate": -1.0}, "learning_rate=-1.0 must be > 0"),
    ({"train.steps": 0}, "train.steps=0 must be a positive integer"),
    ({"model.capacity_factor": 0.0}, "capacity_factor=0.0 must be > 0"),
    ({"data.name": "text"}, "needs data.files"),
    ({"mesh.expert": 2, "mesh.data": 4}, "needs an MoE model"),
    ({"model.softmax_impl": "flash"}, "model.softmax_impl='flash' is not '' (automatic), xla, chunked or cudnn"),
    ({"model.expert_dim": -8}, "model.expert_dim=-8 must be >= 0"),
    ({"train.eval_every": 15}, "train.eval_every=15 must be a multiple of train.log_every=10"),
])
def test_validation_names_the_key(overrides, fragment):
  with pytest.raises(ConfigError, match=None) as e:
    validate(with_overrides(Config(), overrides), 8)
  assert fragment in str(e.value) and str(e.value).count(".") >= 1


def test_unknown_key_and_bad_type():
  with pytest.raises(ConfigError, match="unknown key 'model.atention'"):
    with_overrides(Config(), {"model.atention": "linear"})
  with pytest.raises(ConfigError, match="train.steps='many'"):
    with_overrides(Config(), {"train.steps": "many"})


def test_config_file(tmp_path):
  p = tmp_path / "cfg.py"
  p.write_text("import dataclasses\nfrom efficient_attn.config import Config, ModelConfig\n"
               "def get_config():\n  return Config(model=ModelConfig(attention='linear', num_layers=2))\n")
  assert load_config_file(str(p)).model.attention == "linear"
  with pytest.raises(ConfigError, match="no such file"):
    load_config_file(str(tmp_path / "missing.py"))
  (tmp_path / "bad.py").write_text("x = 1\n")
  with pytest.raises(ConfigError, match="no get_config"):
    load_config_file(str(tmp_path / "bad.py"))
