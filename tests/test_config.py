"""Training config: overrides, validation before compilation, config files."""

import pytest

from efficient_attn.config import Config, ConfigError, ModelConfig, flatten, load_config_file, validate, with_overrides

DESIGN_KEYS = ["model.attention", "model.num_layers", "model.d_model", "model.num_heads", "model.ffn_dim",
               "model.num_experts", "model.top_k", "train.steps", "train.batch_size", "train.seq_len",
               "train.learning_rate", "train.seed", "train.log_every", "train.checkpoint_every", "data.name",
               "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.expert"]


def test_every_design_key_exists():
  assert set(DESIGN_KEYS) <= set(flatten(Config()))


def test_overrides_apply():
  cfg = with_overrides(Config(), {"model.attention": "performer", "train.steps": 7, "train.learning_rate": 1})
  assert cfg.model.attention == "performer" and cfg.train.steps == 7 and cfg.train.learning_rate == 1
  assert validate(cfg, 8) == {"data": 8, "fsdp": 1, "context": 1, "tensor": 1, "expert": 1}


@pytest.mark.parametrize("overrides, fragment", [
    ({"model.attention": "flash"}, "model.attention='flash'"),
    ({"model.num_heads": 3}, "num_heads=3 does not divide model.d_model=256"),
    ({"model.num_experts": 6, "mesh.expert": 4, "mesh.data": 2}, "num_experts=6 is not divisible by mesh.expert=4"),
    ({"model.num_experts": 2, "model.top_k": 3}, "top_k=3 exceeds"),
    ({"mesh.fsdp": 3}, "does not divide the 8 available devices"),
    ({"mesh.data": 2, "mesh.fsdp": 2}, "4 devices, but 8 are available"),
    ({"train.batch_size": 4}, "batch_size=4 is not divisible by the data-parallel size"),
    ({"model.attention": "sparse", "train.seq_len": 100}, "query length 100 is not divisible by block_size=64"),
    ({"model.attention": "local", "model.attention_options.window": 0}, "window"),
    ({"train.learning_rate": float("nan")}, "must be a finite number"),
    ({"train.learning_rate": -1.0}, "learning_rate=-1.0 must be > 0"),
    ({"train.steps": 0}, "train.steps=0 must be a positive integer"),
    ({"model.capacity_factor": 0.0}, "capacity_factor=0.0 must be > 0"),
    ({"data.name": "text"}, "needs data.files"),
    ({"mesh.expert": 2, "mesh.data": 4}, "needs an MoE model"),
    ({"model.attention_options.implementation": "flash"}, "implementation='flash' is not one of"),
    ({"model.expert_dim": -8}, "model.expert_dim=-8 must be >= 0"),
    ({"train.eval_every": 15}, "train.eval_every=15 must be a multiple of train.log_every=10"),
    ({"train.schedule": "step"}, "train.schedule='step' is not one of cosine | linear | constant | wsd"),
    ({"train.grad_accum": 0}, "train.grad_accum=0 must be a positive integer"),
    ({"train.grad_accum": 3}, "train.grad_accum=3 micro-batches of a multiple of the data-parallel size 8"),
    ({"model.dropout": 1.0}, "model.dropout=1.0 must be in [0, 1)"),
])
def test_validation_names_the_key(overrides, fragment):
  with pytest.raises(ConfigError, match=None) as e:
    validate(with_overrides(Config(), overrides), 8)
  assert fragment in str(e.value) and str(e.value).count(".") >= 1


@pytest.mark.parametrize("overrides, devices, need", [
    ({"mesh.data": 2, "mesh.expert": 4, "model.num_experts": 8}, 1, 8),  # README's example on one CPU device
    ({"mesh.fsdp": 4}, 2, 4),                                             # data=-1 cannot fill in
])
def test_a_mesh_larger_than_the_devices_says_how_to_get_more(overrides, devices, need):
  with pytest.raises(ConfigError) as e:
    validate(with_overrides(Config(), overrides), devices)
  msg = str(e.value)
  assert f"XLA_FLAGS=--xla_force_host_platform_device_count={need}" in msg and "more processes" in msg
  assert msg.count(". ") == 0 and msg.endswith(".")  # one sentence
  with pytest.raises(ConfigError) as e:  # more devices than the mesh: no advice to get more
    validate(with_overrides(Config(), {"mesh.data": 2}), 4)
  assert "XLA_FLAGS" not in str(e.value)


def test_unknown_key_and_bad_type():
  with pytest.raises(ConfigError, match="unknown key 'model.atention' for the training config; did you mean"
                                        " 'model.attention'\\? valid keys are data.cache_dir, .*, train.z_loss_weight."):
    with_overrides(Config(), {"model.atention": "linear"})
  with pytest.raises(ConfigError, match="unknown key 'steps'.*did you mean 'train.steps'"):  # the section left out
    with_overrides(Config(), {"steps": 3})
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


def test_attention_options_are_typed_and_follow_the_family():
  """model.attention_options.KEY is checked against the selected family's options before anything compiles."""
  from efficient_attn.attention.local import LocalOptions

  cfg = with_overrides(Config(), {"model.attention": "local", "model.attention_options.window": 64})
  assert cfg.model.attention_options == LocalOptions(window=64)
  assert flatten(cfg)["model.attention_options.window"] == 64 and "model.window" not in flatten(cfg)
  # A misspelt option is refused with the valid ones, whatever the order of the overrides.
  with pytest.raises(ConfigError,
                     match="no option 'windw'; did you mean 'window'\\? its options are window, block_size"):
    with_overrides(Config(), {"model.attention_options.windw": 3, "model.attention": "local"})
  with pytest.raises(ConfigError, match="has no option 'window'"):  # softmax has no window
    with_overrides(Config(), {"model.attention_options.window": 3})
  with pytest.raises(ConfigError, match="window='big' has type str"):
    with_overrides(Config(), {"model.attention": "local", "model.attention_options.window": "big"})
  # Switching family starts from the new family's defaults; the same family keeps its options.
  assert with_overrides(cfg, {"model.attention": "linear"}).model.options.chunk_size is None
  assert with_overrides(cfg, {"train.steps": 3}).model.attention_options.window == 64
  # Mappings become the typed options (hashable: modules hash their config).
  m = ModelConfig(attention="sparse", attention_options={"block_size": 32})
  assert m.options.block_size == 32 and hash(m) == hash(ModelConfig(attention="sparse",
                                                                      attention_options={"block_size": 32}))
  with pytest.raises(ConfigError, match="no option 'bs'"):
    ModelConfig(attention="sparse", attention_options={"bs": 32})
  # The softmax tile and the kernelized chunk are separate options of separate families.
  assert with_overrides(Config(), {"model.attention_options.chunk_size": [128, 256]}).model.options.chunk_size == (
      128, 256)


def test_unknown_family_did_you_mean():
  with pytest.raises(ConfigError, match="model.attention='performr' is not a registered attention family; did you"
                                        " mean 'performer'\\? valid ones are \\['softmax'"):
    validate(with_overrides(Config(), {"model.attention": "performr"}), 8)
  with pytest.raises(ConfigError, match="model.attention='flash' is not a registered attention family; valid ones"):
    validate(with_overrides(Config(), {"model.attention": "flash"}), 8)  # nothing close: no guess
