"""The `efficient-attn` command line: overrides, bench tables, and clean refusals (exit 2)."""

import json
import subprocess
import sys

import pytest

from efficient_attn import cli
from efficient_attn.config import ConfigError, apply_overrides, parse_overrides, parse_value


def test_parse_value_literals_and_strings():
  assert parse_value("20") == 20
  assert parse_value("1e-3") == 1e-3
  assert parse_value("[1024,2048]") == [1024, 2048]
  assert parse_value("true") is True and parse_value("False") is False
  assert parse_value("performer") == "performer"
  # Never evaluated as code: an expression stays a string.
  assert parse_value("__import__('os').getcwd()") == "__import__('os').getcwd()"


def test_parse_overrides_rejects_malformed():
  assert parse_overrides(["train.steps=20", "model.attention=linear"]) == {"train.steps": 20,
                                                                           "model.attention": "linear"}
  for bad in ["train.steps", "=3", "a..b=1", "1x=2"]:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
      parse_overrides([bad])


def test_apply_overrides_checks_keys_and_types():
  d = {"steps": 10, "lr": 0.1, "lens": [1, 2], "name": "x"}
  assert apply_overrides(d, {"lr": 1, "lens": (3,)}, "t") == {"steps": 10, "lr": 1, "lens": [3], "name": "x"}
  with pytest.raises(ConfigError, match="unknown key 'stpes'.*valid keys"):
    apply_overrides(d, {"stpes": 3}, "t")
  with pytest.raises(ConfigError, match="steps='ten'.*expected int"):
    apply_overrides(d, {"steps": "ten"}, "t")
  with pytest.raises(ConfigError, match="expected int"):
    apply_overrides(d, {"steps": True}, "t")


def test_bench_settings_one_parser_for_both_benches():
  from efficient_attn.measure import bench_settings

  d = {"seq_lens": [1024, 2048], "repeats": 3}
  assert bench_settings(d, {"seq_lens": 512}, "bench x") == {"seq_lens": [512], "repeats": 3}  # scalar -> [scalar]
  assert bench_settings(d, None, "bench x") == d
  with pytest.raises(ConfigError, match="unknown key 'lens' for bench x; valid keys are repeats, seq_lens."):
    bench_settings(d, {"lens": [1]}, "bench x")
  with pytest.raises(ConfigError, match="repeats=2.5 has type float, expected int"):
    bench_settings(d, {"repeats": 2.5}, "bench x")


def test_bench_attention_small_writes_json(tmp_path, capsys):
  out = tmp_path / "rows.json"
  rc = cli.main(["bench", "attention", "--set", "seq_lens=[128]", "--set", "attention_options.local.window=32",
                 "--set", "attention_options.sparse.block_size=32", "--set",
                 "attention_options.performer.num_features=16", "--set", "repeats=1", "--json", str(out)])
  assert rc == 0
  rows = json.loads(out.read_text())
  assert {r["variant"] for r in rows} == {"jax_nn", "softmax", "softmax_chunked", "local", "sparse", "linear",
                                          "performer"}
  base = next(r for r in rows if r["variant"] == "jax_nn")
  assert base["speedup"] == pytest.approx(1.0) and base["memory_ratio"] == pytest.approx(1.0)
  assert all(r["time_s"] > 0 and r["temp_bytes"] >= 0 for r in rows)
  flops = {r["variant"]: r["gflops_ideal"] for r in rows}  # each family's own count: local < causal softmax
  assert 0 < flops["local"] < flops["softmax"] == flops["softmax_chunked"] == flops["jax_nn"]
  table = capsys.readouterr().out
  assert "| variant |" in table and "performer" in table


@pytest.mark.parametrize("args, fragment", [
    (["bench", "attention", "--set", "sequence=3"], "unknown key 'sequence'"),
    (["bench", "attention", "--set", "variants=['flash']"], "unknown variants"),
    (["bench", "attention", "--set", "seq_lens=[100]"], "not divisible by block_size=64"),
    (["bench", "attention", "--set", "attention_options.local.windw=3"], "no option 'windw'"),
    (["bench", "attention", "--set", "nonsense"], "KEY=VALUE"),
    (["bench", "attention", "--json", "/no/such/dir/x.json"], "does not exist"),
])
def test_bench_bad_input_exits_2(args, fragment, capsys):
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert fragment in err and "Traceback" not in err and err.count("\n") == 1


def test_console_script_unknown_bench_target():
  r = subprocess.run([sys.executable, "-m", "efficient_attn.cli", "bench", "flops"], capture_output=True, text=True)
  assert r.returncode == 2 and "invalid choice" in r.stderr


def test_bench_moe_small_through_the_cli(capsys):
  rc = cli.main(["bench", "moe", "--set", "batch=2", "--set", "seq_len=32", "--set", "d_model=16", "--set",
                 "hidden_dim=32", "--set", "num_experts=[4]", "--set", "variants=['dense','switch_cf1.25']",
                 "--set", "repeats=1", "--set", "rounds=1", "--set", "min_time=0.0"])
  out = capsys.readouterr().out
  assert rc == 0 and "switch_cf1.25" in out and "dense" in out


def test_bench_moe_unknown_setting_exits_2(capsys):
  assert cli.main(["bench", "moe", "--set", "experts=8"]) == 2
  err = capsys.readouterr().err
  assert "unknown key 'experts' for bench moe" in err and "Traceback" not in err
