"""The experiment runner and the language-model experiments (quickstart, equal_compute, moe_scaling, long_context).

Each runs end to end at smoke=true; a rerun resumes finished variants; a workdir
with other settings is refused without touching it; the equal-compute budget is
the same for every family; mesh.context=2 (each sequence on two devices) trains to the
same losses; bad settings exit 2 with one sentence.
"""

import json
import os

import pytest

from efficient_attn import cli, experiment, flops
from efficient_attn.config import ConfigError


def _run(name, workdir, **overrides):
  return experiment.run(name, str(workdir), {"smoke": True, **overrides}, progress=False)


def _check_outputs(workdir, out, num_rows, header):
  lines = open(os.path.join(workdir, "results.jsonl")).read().splitlines()
  assert [json.loads(x) for x in lines] == out["rows"] and len(lines) == num_rows
  summary = open(os.path.join(workdir, "summary.md")).read()
  assert header in summary and summary.count("\n|") >= num_rows + 1
  assert out["plots"] and all(os.path.getsize(p) > 5000 for p in out["plots"])


@pytest.mark.slow
def test_quickstart_smoke_resume_and_refusal(tmp_path, monkeypatch):
  out = _run("quickstart", tmp_path)
  _check_outputs(tmp_path, out, 3, "| variant | val loss |")
  rows = {r["variant"]: r for r in out["rows"]}
  assert set(rows) == {"softmax", "linear", "softmax+moe"}
  for r in rows.values():
    assert r["curve_step"][-1] == r["steps"] == 6 and r["val_loss"] > 0 and r["tokens_per_sec"] > 0
    assert 0 < r["flops_per_token"] <= r["executed_flops_per_token"]
    assert r["memory_bytes"] > 0 and r["time_s"] > 0
  # A rerun resumes: nothing is trained again and the same rows come back.
  quickstart = experiment.load("quickstart")
  monkeypatch.setattr(quickstart, "run_variant", lambda *a: pytest.fail("finished variant was rerun"))
  assert _run("quickstart", tmp_path)["rows"] == out["rows"]
  # Other settings in the same workdir: refused, and nothing already saved changes.
  before = open(tmp_path / "results.jsonl").read()
  with pytest.raises(ConfigError, match="different settings.*steps=6 there vs 7 now"):
    _run("quickstart", tmp_path, steps=7)
  assert open(tmp_path / "results.jsonl").read() == before


@pytest.mark.slow
def test_killed_variant_is_redone_and_others_kept(tmp_path, monkeypatch):
  equal_compute = experiment.load("equal_compute")
  real = equal_compute.run_variant
  calls = []

  def flaky(cfg, name, ctx):
    calls.append(name)
    if name == "linear" and calls.count("linear") == 1:
      raise KeyboardInterrupt  # killed in the middle of the second variant
    return real(cfg, name, ctx)

  monkeypatch.setattr(equal_compute, "run_variant", flaky)
  with pytest.raises(KeyboardInterrupt):
    _run("equal_compute", tmp_path)
  assert [json.loads(x)["variant"] for x in open(tmp_path / "results.jsonl")] == ["softmax"]
  out = _run("equal_compute", tmp_path)
  assert calls == ["softmax", "linear", "linear"]
  _check_outputs(tmp_path, out, 2, "| family | steps |")
  assert "s to softmax's loss" in out["summary"]


@pytest.mark.parametrize("overrides", [{}, {"smoke": True}, {"seq_len": 1024, "attention_options.local.window": 64}])
def test_equal_compute_budget_is_equal(overrides):
  equal_compute = experiment.load("equal_compute")
  cfg = experiment.resolve_config(equal_compute, overrides)
  budget = equal_compute.budget(cfg)
  steps = {}
  for family in equal_compute.FAMILIES:
    per_step = flops.model_flops_per_token(equal_compute._model_config(cfg, family), cfg["seq_len"])["train"] \
        * cfg["batch_size"] * cfg["seq_len"]
    steps[family] = equal_compute.steps_for(cfg, family)
    assert abs(steps[family] * per_step - budget) <= per_step / 2 + 1e-6 * budget, family
  assert steps["softmax"] == cfg["reference_steps"]
  if cfg["seq_len"] >= 512:  # cheaper attention buys more steps
    assert steps["local"] > steps["softmax"] and steps["linear"] > steps["softmax"]


@pytest.mark.slow
def test_moe_scaling_smoke_equal_active_flops(tmp_path):
  out = _run("moe_scaling", tmp_path)
  _check_outputs(tmp_path, out, 2, "| variant | E | k |")
  rows = {r["variant"]: r for r in out["rows"]}
  dense, top2 = rows["dense"], rows["top2-e8"]
  assert top2["expert_ffn_dim"] * 2 == dense["expert_ffn_dim"] and top2["top_k"] == 2
  # Validation every eval_every=2 steps on the same held-out batches: the speed-up is read from these curves.
  for r in rows.values():
    assert r["val_step"] == [2, 4] and r["val_curve"][-1] == pytest.approx(r["val_loss"])
  assert "validation loss (the same held-out batches every 2 steps)" in out["summary"]
  # Equal active FLOPs per token up to the router's (2·D·E per MoE layer, forward, ×3 for training).
  router = 3 * 2 * 32 * 8 * 1  # smoke: d_model 32, one MoE layer (2 layers, moe_every 2)
  assert top2["flops_per_token"] == pytest.approx(dense["flops_per_token"] + router, rel=1e-9)
  assert top2["executed_flops_per_token"] > top2["flops_per_token"]  # capacity padding is executed
  moe_scaling = experiment.load("moe_scaling")
  for name in moe_scaling.VARIANTS:  # every variant, not only the smoke's: same active FLOPs
    m = moe_scaling._config(experiment.resolve_config(moe_scaling, {}), name).model
    E = m.num_experts
    expected = flops.model_flops_per_token(moe_scaling._config(experiment.resolve_config(moe_scaling, {}),
                                                               "dense").model, 256)["train"] + 3 * 2 * 256 * E * 2
    assert flops.model_flops_per_token(m, 256)["train"] == pytest.approx(expected, rel=1e-9), name
  assert dense["executed_flops_per_token"] >= dense["flops_per_token"]
  assert "Fedus et al. 2021" in out["summary"] and "7x" in out["summary"]


@pytest.mark.slow
def test_equal_compute_split_over_two_devices_gives_the_same_losses(tmp_path):
  rows = {P: _run("equal_compute", tmp_path / f"context{P}", variants=["softmax"], **{"mesh.context": P})["rows"]
          for P in (1, 2)}
  (one,), (two,) = rows[1], rows[2]
  assert two["steps"] == one["steps"] and two["val_step"] == one["val_step"]
  for key in ("loss", "val_loss"):
    assert two[key] == pytest.approx(one[key], abs=1e-4), key
  assert two["curve_loss"] == pytest.approx(one["curve_loss"], abs=1e-4)
  assert json.loads((tmp_path / "context2" / "config.json").read_text())["mesh.context"] == 2


def test_runner_keys_are_in_every_config_and_older_workdirs_still_resume(tmp_path):
  cfg = experiment.resolve_config(experiment.load("equal_compute"), {"smoke": True})
  assert cfg["mesh.context"] == 1 and cfg["mesh.context_layout"] == "zigzag"
  older = {k: v for k, v in cfg.items() if not k.startswith("mesh.")}  # config.json from before these keys
  (tmp_path / "config.json").write_text(json.dumps(older))
  experiment._check_same_config(str(tmp_path), cfg)  # the same settings: resumes
  with pytest.raises(ConfigError, match="mesh.context=1 there vs 2 now"):
    experiment._check_same_config(str(tmp_path), {**cfg, "mesh.context": 2})


USER_EXPERIMENT = '''"""Mine: one variant, one row."""
import os

from efficient_attn.experiment import line_plot

from . import _lm  # the built-in experiments' shared helpers are importable from a user's file


def get_config():
  return {"smoke": False, "scale": 2}


SMOKE = {}


def variants(cfg):
  return ["a"]


def run_variant(cfg, name, ctx):
  return [{"x": cfg["scale"] * 1.5, "helpers": callable(_lm.train_variant)}]


def summarize(cfg, rows):
  return "| x |\\n|---|\\n" + "".join(f"| {r['x']} |\\n" for r in rows)


def plot(cfg, rows, workdir):
  return [line_plot(os.path.join(workdir, "x.png"), {"x": ([1], [rows[0]["x"]])}, xlabel="", ylabel="", title="")]
'''


def test_experiment_files_load_by_path(tmp_path, capsys):
  """Experiments are files loaded by path (no top-level `experiments` package); a user's FILE.py runs too."""
  quickstart = experiment.load("quickstart")
  assert quickstart.__name__ == "efficient_attn._experiments.quickstart"
  assert os.path.dirname(quickstart.__file__) == experiment.experiments_dir()
  assert experiment.load("quickstart") is quickstart  # loaded once
  mine = tmp_path / "my_exp.py"
  mine.write_text(USER_EXPERIMENT)
  workdir = tmp_path / "w"
  assert cli.main(["experiment", str(mine), "--workdir", str(workdir), "--set", "scale=3"]) == 0
  rows = [json.loads(x) for x in open(workdir / "results.jsonl")]
  assert rows == [{"experiment": "my_exp", "variant": "a", "x": 4.5, "helpers": True}]
  assert open(workdir / "summary.md").read().startswith("# my_exp: Mine: one variant, one row.")
  (tmp_path / "quickstart.py").write_text(USER_EXPERIMENT)  # would shadow the built-in one
  capsys.readouterr()
  assert cli.main(["experiment", str(tmp_path / "quickstart.py"), "--workdir", str(workdir)]) == 2
  assert "rename it" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["experiment", "nonesuch"], "unknown experiment 'nonesuch'; valid experiments are quickstart"),
    (["experiment", "nonesuch.py"], "experiment file nonesuch.py does not exist"),
    (["experiment", "quickstart", "--set", "stepz=3"], "unknown key 'stepz' for experiment quickstart"),
    (["experiment", "quickstart", "--set", "variants=['softmax', 'flash']"], "unknown variants ['flash']"),
    (["experiment", "equal_compute", "--set", "budget_flops=1000.0"], "too small to run one step"),
    (["experiment", "equal_compute", "--set", "seq_len=100"], "not divisible by block_size=64"),
    (["experiment", "equal_compute", "--set", "variants=['softmax', 'mine']"], "use distinct names from"),
    (["experiment", "moe_scaling", "--set", "moe_every=9"], "moe_every=9 exceeds num_layers=4"),
    (["experiment", "quickstart", "--set", "mesh_data=4"], "the mesh needs 16 devices but 8 are available"),
    (["experiment", "moe_scaling", "--set", "steps=-1"], "train.steps=-1 must be a positive integer"),
    (["experiment", "long_context", "--set", "contexts=[1, 16]"], "needs 16 devices, but 8 are available"),
    (["experiment", "long_context", "--set", "start_len=100"], "T=100 is not a multiple of 8"),
    (["experiment", "equal_compute", "--set", "mesh.context=3"], "6 equal pieces, and T=512 is not a multiple of 6"),
    (["experiment", "moe_scaling", "--set", "mesh.context=0"], "mesh.context=0 must be a positive integer"),
    (["experiment", "quickstart", "--set", "mesh.context=16"], "mesh.context=16 needs 16 devices, but 8 are"),
    (["experiment", "quickstart", "--set", "mesh.context=2"], "the mesh needs 16 devices but 8 are available"),
    (["experiment", "equal_compute", "--set", "mesh.context_layout=ring"], "'ring' is not one of contiguous"),
    (["experiment", "long_context", "--set", "mesh.context=4"], "set its own contexts list instead"),
])
def test_bad_settings_exit_2_before_anything_runs(tmp_path, capsys, argv, needle):
  workdir = tmp_path / "w"
  assert cli.main([*argv, "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err
  assert needle in err and err.count("\n") == 1 and "Traceback" not in err
  assert not workdir.exists()


def test_long_context_reach_grows_with_the_devices_and_only_the_split_moves_bytes(tmp_path):
  out = _run("long_context", tmp_path, families=["gla"])
  _check_outputs(tmp_path, out, 4, "Longest trainable sequence within 2 MiB per device")
  reach = {r["context"]: r for r in out["rows"] if r["kind"] == "reach"}
  timed = {r["context"]: r for r in out["rows"] if r["kind"] == "time"}
  assert reach[1]["max_len"] == 128 and reach[2]["max_len"] == 256 and reach[2]["capped"]
  for r in reach.values():  # the reach fits the budget; the next length probed from it did not (or is capped)
    assert r["device_bytes"] <= 2 * 2**20
  assert reach[1]["probes"][-1]["device_bytes"] > 2 * 2**20
  # memory per device falls with the split; only the split program moves bytes, a state of fixed size
  assert timed[2]["temp_bytes"] < timed[1]["temp_bytes"]
  assert timed[1]["collective_bytes"] == 0 < timed[2]["collective_bytes"]
  assert all(r["step_time_s"] > 0 for r in timed.values())
