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
  with pytest.raises(ConfigError, match="unknown key 'stpes' for t; did you mean 'steps'\\? valid keys are lens, lr,"
                                        " name, steps."):
    apply_overrides(d, {"stpes": 3}, "t")
  with pytest.raises(ConfigError, match="unknown key 'zzz' for t; valid keys are"):  # nothing close: no guess
    apply_overrides(d, {"zzz": 3}, "t")
  with pytest.raises(ConfigError, match="steps='ten'.*expected int"):
    apply_overrides(d, {"steps": "ten"}, "t")
  with pytest.raises(ConfigError, match="expected int"):
    apply_overrides(d, {"steps": True}, "t")


def test_bench_settings_one_parser_for_both_benches():
  from efficient_attn.bench import bench_settings

  d = {"seq_lens": [1024, 2048], "repeats": 3}
  assert bench_settings(d, {"seq_lens": 512}, "bench x") == {"seq_lens": [512], "repeats": 3}  # scalar -> [scalar]
  assert bench_settings(d, None, "bench x") == d
  with pytest.raises(ConfigError, match="unknown key 'lens' for bench x; did you mean 'seq_lens'\\? valid keys are"
                                        " repeats, seq_lens."):
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
  # Spread over the default 3 rounds; ratios of medians; every row carries its settings and options.
  for r in rows:
    assert len(r["times_s"]) == 3 and r["time_min_s"] == min(r["times_s"]) and r["time_max_s"] == max(r["times_s"])
    assert r["time_s"] == sorted(r["times_s"])[1] and r["speedup"] == pytest.approx(base["time_s"] / r["time_s"])
    s = r["settings"]
    assert (s["batch"], s["num_heads"], s["head_dim"], s["dtype"], s["rounds"], s["seq_lens"]) == (
        1, 4, 64, "float32", 3, [128]) and s["backend"] == "cpu"
  opts = {r["variant"]: r["options"] for r in rows}
  assert opts["local"]["window"] == 32 and opts["performer"]["num_features"] == 16
  assert opts["softmax_chunked"]["implementation"] == "chunked" and opts["sparse"]["block_size"] == 32
  out = capsys.readouterr().out
  header, table = out.split("\n\n", 1)
  for fragment in ("batch=1", "num_heads=4", "head_dim=64", "dtype=float32", "seq_lens=[128]", "rounds=3",
                   "local: window=32", "performer: num_features=16", "median over 3 rounds"):
    assert fragment in header, fragment
  assert "| variant | T | fwd+bwd s (median) | min | max |" in table and "performer" in table


def test_interleaved_times_warm_up_then_rotate():
  from efficient_attn.measure import interleaved_times, spread

  log = []
  calls = [lambda i=i: log.append(i) for i in range(3)]
  times = interleaved_times(calls, rounds=4, repeats=1, min_time=0.0)
  assert log == [0, 1, 2] + [0, 1, 2] + [1, 2, 0] + [2, 0, 1] + [0, 1, 2]  # warm-up, then round r starts at r
  assert [len(t) for t in times] == [4, 4, 4] and all(x >= 0 for t in times for x in t)
  log.clear()
  interleaved_times(calls[:1], rounds=2, repeats=3, min_time=0.0)
  assert log == [0] * 7
  assert spread([3.0, 1.0, 2.0]) == {"time_s": 2.0, "time_min_s": 1.0, "time_max_s": 3.0}
  assert spread([4.0, 1.0, 2.0, 3.0])["time_s"] == 2.5


@pytest.mark.parametrize("argv, fragments", [
    (["bench", "--help"], ["bench attention:", "seq_lens=[1024, 2048, 4096, 8192]", "rounds=3", "head_dim=64",
                           "bench moe:", "num_experts=[4, 8, 16]", "min_time=0.2"]),
    (["bench", "attention", "--help"], ["attention_options={'local': {'window': 256}", "repeats=1"]),
    (["generate", "--help"], ["--prompt", "sample.temperature=1.0", "sample.top_k=0", "sample.top_p=1.0",
                              "sample.max_new_tokens=0", "sample.seed=0"]),
    (["eval", "--help"], ["eval.batches=0"]),
])
def test_help_lists_the_keys_and_defaults(argv, fragments, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  out = capsys.readouterr().out
  assert e.value.code == 0 and all(f in out for f in fragments), out


@pytest.mark.parametrize("args, fragment", [
    (["bench", "attention", "--set", "sequence=3"], "unknown key 'sequence'"),
    (["bench", "attention", "--set", "seq_len=3"],
     "unknown key 'seq_len' for bench attention; did you mean 'seq_lens'?"),
    (["bench", "attention", "--set", "variants=['flash']"], "unknown variants"),
    (["bench", "attention", "--set", "variants=['performr']"], "did you mean 'performer'?"),
    (["bench", "attention", "--set", "attention_options.lcoal.window=3"],
     "attention_options.lcoal: unknown attention family 'lcoal'; did you mean 'local'?"),
    (["bench", "attention", "--set", "rounds=0"], "rounds=0 must be a positive integer"),
    (["bench", "moe", "--set", "variants=['switch_cf1.5']"], "did you mean 'switch_cf1.25'?"),
    (["bench", "moe", "--set", "min_time=-1.0"], "'min_time'=-1.0 must be >= 0"),
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


def test_bench_moe_small_through_the_cli(tmp_path, capsys):
  rc = cli.main(["bench", "moe", "--set", "batch=2", "--set", "seq_len=32", "--set", "d_model=16", "--set",
                 "hidden_dim=32", "--set", "num_experts=[4]", "--set", "variants=['dense','switch_cf1.25']",
                 "--set", "repeats=1", "--set", "rounds=2", "--set", "min_time=0.0",
                 "--json", str(tmp_path / "m.json")])
  out = capsys.readouterr().out
  assert rc == 0 and "switch_cf1.25" in out and "dense" in out
  assert out.startswith("bench moe: batch=2 seq_len=32 d_model=16 hidden_dim=32") and "rounds=2" in out
  rows = json.loads((tmp_path / "m.json").read_text())
  for r in rows:
    assert r["settings"]["d_model"] == 16 and r["settings"]["rounds"] == 2 and len(r["times_s"]) == 2
    assert r["time_min_s"] <= r["time_s"] <= r["time_max_s"]
    assert r["time_vs_dense"] == pytest.approx(r["time_s"] / rows[0]["time_s"])


def test_bench_moe_unknown_setting_exits_2(capsys):
  assert cli.main(["bench", "moe", "--set", "experts=8"]) == 2
  err = capsys.readouterr().err
  assert "unknown key 'experts' for bench moe" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, fragment", [
    (["experiment", "quickstrat"], "unknown experiment 'quickstrat'; did you mean 'quickstart'? valid experiments"
                                   " are quickstart, "),
    (["experiment", "quickstart", "--set", "steps=2", "--set", "variant=['linear']"],
     "unknown key 'variant' for experiment quickstart; did you mean 'variants'?"),
    (["experiment", "quickstart", "--set", "variants=['lineer']"], "did you mean 'linear'?"),
    (["experiment", "equal_compute", "--set", "variants=['softmax', 'perfomer']"],
     "'perfomer' is not one; did you mean 'performer'? use distinct names from"),
    (["experiment", "equal_compute", "--set", "attention_options.lcoal.window=8"],
     "attention_options.lcoal for experiment equal_compute: unknown attention family 'lcoal'; did you mean 'local'?"),
    (["train", "--set", "model.atention=linear"], "unknown key 'model.atention' for the training config; did you mean"
                                                  " 'model.attention'?"),
])
def test_did_you_mean(argv, fragment, tmp_path, capsys):
  assert cli.main(argv[:2] + ["--workdir", str(tmp_path / "w")] + argv[2:] if argv[0] == "experiment"
                  else argv[:1] + ["--workdir", str(tmp_path / "w")] + argv[1:]) == 2
  err = capsys.readouterr().err
  assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, err
