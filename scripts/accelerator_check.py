"""The device check behind scripts/accelerator_check.sh: kernel tests on the real chip, then the attention
and MoE benches in bfloat16, each attention variant in its own process (so the device's peak memory is
that variant's), printed as one Markdown table. DRY=1 runs it all on CPU at toy sizes (the plumbing only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

DRY = os.environ.get("DRY") == "1"


def sh(*cmd: str, check: bool = True) -> int:
  print("+", " ".join(cmd), flush=True)
  return subprocess.run(cmd, check=check).returncode


def main() -> int:
  import jax

  platform = jax.default_backend()
  kind = jax.devices()[0].device_kind
  if platform == "cpu" and not DRY:
    print("accelerator_check: no GPU / TPU here (jax.default_backend() is 'cpu'); DRY=1 runs the plumbing on CPU.")
    return 1
  print(f"accelerator_check: {platform} ({kind}), jax {jax.__version__}", flush=True)

  # 1. The kernel tests on the chip: splash compiles for TPU, the Triton kernel for GPU (the other runs interpreted).
  tests = sh(sys.executable, "-m", "pytest", "-q", "-x", "tests/test_kernels.py", "-k", "not lowers",
             check=False) if not DRY else 0

  # 2. Attention: every variant at each length, one process per variant.
  gpu = platform == "gpu"
  variants = (["jax_nn", "jax_nn_cudnn", "softmax_cudnn", "softmax_triton"] if gpu else
              ["jax_nn", "softmax_splash"] if platform == "tpu" else ["jax_nn", "softmax_splash"])
  from efficient_attn.attention import names  # every registered family (the newer ones too)

  variants += ["softmax_chunked"] + [n for n in names() if n != "softmax"]
  seq_lens = [512, 1024] if DRY else [2048, 8192, 32768]
  common = ["--set", f"seq_lens={seq_lens}", "--set", "dtype='bfloat16'", "--set", "num_heads=8",
            "--set", "num_kv_heads=8", "--set", f"head_dim={16 if DRY else 128}", "--set", "batch=1",
            "--set", "rounds=3"]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for v in variants:
      out = os.path.join(tmp, f"{v}.json")
      if sh("efficient-attn", "bench", "attention", "--set", f"variants=['{v}']", *common, "--json", out,
            check=False) == 0:
        rows += json.load(open(out))
      else:
        print(f"accelerator_check: variant {v} failed (see above); left out of the table.")
    moe_json = os.path.join(tmp, "moe.json")
    moe = ["--set", "dtype='bfloat16'", "--set", "num_experts=[8]"] + (
        ["--set", "batch=2", "--set", "seq_len=64", "--set", "d_model=32", "--set", "hidden_dim=64"] if DRY else
        ["--set", "batch=16", "--set", "seq_len=2048", "--set", "d_model=1024", "--set", "hidden_dim=4096"])
    moe_ok = sh("efficient-attn", "bench", "moe", *moe, "--json", moe_json, check=False) == 0
    moe_rows = json.load(open(moe_json)) if moe_ok else []

  print(f"\n## Device check: {kind}, bfloat16, B=1, N=K=8, H={16 if DRY else 128}, causal\n")
  print("| variant | T | fwd+bwd ms (median, min-max) | vs jax.nn (XLA) | peak device GiB | TFLOP/s | of chip peak |")
  print("|---|---|---|---|---|---|---|")
  for r in sorted(rows, key=lambda r: (r["seq_len"], variants.index(r["variant"]))):
    base = next((b for b in rows if b["variant"] == "jax_nn" and b["seq_len"] == r["seq_len"]), None)
    ratio = f"{base['time_s'] / r['time_s']:.2f}x" if base else "-"
    peak = f"{r['device_peak_bytes'] / 2**30:.2f}" if r.get("device_peak_bytes") else "-"
    frac = f"{100 * r['peak_fraction']:.0f}%" if r.get("peak_fraction") else "-"
    print(f"| {r['variant']} | {r['seq_len']} | {1e3 * r['time_s']:.2f} ({1e3 * r['time_min_s']:.2f}-"
          f"{1e3 * r['time_max_s']:.2f}) | {ratio} | {peak} | {r['tflops_per_s']:.1f} | {frac} |")
  if moe_rows:
    print("\n| MoE variant | E | fwd+bwd ms (median) |\n|---|---|---|")
    for r in moe_rows:
      print(f"| {r['variant']} | {r.get('num_experts', '-')} | {1e3 * r['time_s']:.2f} |")
  print(f"\nkernel tests: {'passed' if tests == 0 else 'FAILED'}")
  return 0 if tests == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
