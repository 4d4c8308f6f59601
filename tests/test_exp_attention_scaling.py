"""experiments/attention_scaling.py: the smoke run end to end, its properties, resume and bad settings."""

import os

import pytest

from efficient_attn import experiment
from efficient_attn.config import ConfigError

A = experiment.load("attention_scaling")

LENGTHS = (256, 512)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("attention_scaling"))
  return workdir, experiment.run("attention_scaling", workdir, {"smoke": True}, progress=False)


def _row(out, family, T):
  (row,) = [r for r in out["rows"] if r["variant"] == family and r["seq_len"] == T]
  return row


@pytest.mark.slow
def test_smoke_rows_table_and_plots(smoke):
  workdir, out = smoke
  assert sorted((r["variant"], r["seq_len"]) for r in out["rows"]) == sorted(
      (f, T) for f in A.FAMILIES for T in LENGTHS)
  for r in out["rows"]:
    assert r["skipped"] is None and r["repeats"] == 2 and r["load_avg"] is not None and r["context"] == 1
    assert r["step_time_s"] > 0 and r["memory_bytes"] > 0 and r["flops"] > 0
    assert r["tokens_per_sec"] == pytest.approx(r["seq_len"] / r["step_time_s"])
    base = _row(out, "softmax", r["seq_len"])
    assert r["speedup"] == pytest.approx(base["step_time_s"] / r["step_time_s"])
    assert r["memory_ratio"] == pytest.approx(r["memory_bytes"] / base["memory_bytes"])
  for T in LENGTHS:
    assert _row(out, "softmax", T)["speedup"] == 1.0 and _row(out, "softmax", T)["memory_ratio"] == 1.0
  summary = open(os.path.join(workdir, "summary.md")).read()
  assert summary == out["summary"]
  assert f"| linear | 512 | {_row(out, 'linear', 512)['step_time_s']:.4f} |" in summary
  assert f"{_row(out, 'linear', 512)['memory_ratio']:.3f}" in summary
  for anchor in ("5.7x", "9.48", "Performer", "BigBird", "1.1x / 0.30x"):  # LRA Table 2
    assert anchor in summary
  assert len(open(os.path.join(workdir, "results.jsonl")).readlines()) == len(out["rows"])
  assert [os.path.basename(p) for p in out["plots"]] == ["attention_scaling_time.png", "attention_scaling_memory.png"]
  for p in out["plots"]:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_smoke_memory_scales_as_each_family_should(smoke):
  _, out = smoke
  mem = lambda f, T: _row(out, f, T)["memory_bytes"]  # noqa: E731
  # Materialised T x T logits: the XLA softmax needs the most memory at the longer length, and it grows
  # faster than the linear-memory families' (which at most double when T doubles).
  for f in ("local", "linear", "performer", "softmax_chunked"):
    assert mem(f, 512) < mem("softmax", 512), f
  assert mem("softmax", 512) / mem("softmax", 256) > 2.4
  for f in ("local", "linear", "performer"):
    assert mem(f, 512) / mem(f, 256) < 2.1, f
  # The two softmax rows really ran different code paths (their implementation options took effect).
  assert mem("softmax_chunked", 512) < 0.7 * mem("softmax", 512)
  # Ideal training FLOPs: the kernelized families need fewer than causal softmax at 512.
  assert _row(out, "linear", 512)["flops"] < _row(out, "softmax", 512)["flops"]


@pytest.mark.slow
def test_rerun_resumes_finished_variants(smoke, monkeypatch):
  workdir, out = smoke

  def boom(*args, **kwargs):
    raise AssertionError("a finished variant was run again")

  monkeypatch.setattr(A, "run_variant", boom)
  again = experiment.run("attention_scaling", workdir, {"smoke": True}, progress=False)
  assert again["rows"] == out["rows"]


@pytest.mark.slow
def test_smoke_split_over_two_devices(tmp_path):
  overrides = {"smoke": True, "families": ["softmax", "linear"], "seq_lens": [256], "mesh.context": 2}
  out = experiment.run("attention_scaling", str(tmp_path), overrides, progress=False)
  assert [(r["variant"], r["seq_len"], r["context"]) for r in out["rows"]] == [("softmax", 256, 2), ("linear", 256, 2)]
  for r in out["rows"]:
    assert r["skipped"] is None and r["step_time_s"] > 0 and r["memory_bytes"] > 0
  assert "Each sequence is split over 2 devices (mesh.context, zigzag layout)" in out["summary"]


@pytest.mark.parametrize("overrides, words", [
    ({"families": ["softmax", "flash"]}, "families"),
    ({"families": []}, "families"),
    ({"families": ["linear", "linear"]}, "distinct"),
    ({"seq_lens": [100]}, "block_size=64"),
    ({"attention_options": {"local": {"windw": 3}}}, "no option 'windw'"),
    ({"attention_options": {"sparse": {"pattern": "dense"}}}, "pattern='dense'"),
    ({"seq_lens": [0]}, "seq_lens"),
    ({"num_heads": 3}, "num_heads"),
    ({"repeats": 0}, "repeats"),
    ({"mesh.context": 3}, "T=1024 is not a multiple of 6"),
])
def test_bad_settings_raise_one_sentence(overrides, words, tmp_path):
  with pytest.raises(ConfigError, match=words):
    experiment.run("attention_scaling", str(tmp_path), overrides, progress=False)
  assert not os.listdir(tmp_path)  # refused before anything ran or was written


def test_cli_bad_length_exits_2(tmp_path, capsys):
  from efficient_attn import cli

  assert cli.main(["experiment", "attention_scaling", "--workdir", str(tmp_path), "--set", "seq_lens=[100]"]) == 2
  assert "block_size" in capsys.readouterr().err
